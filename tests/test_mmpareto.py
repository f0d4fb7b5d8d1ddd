import copy
import math
import re

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_mmbalance import MMPareto
from lightning_mmbalance.functional import mmpareto_combine, pareto_weights
from tests.helpers.pareto_tiny import PairData, PairDataModule, ParetoTiny
from tests.helpers.tiny import TinyData, TinyModel, assert_states_close, trainer_kwargs

ENCODERS = {"audio": "audio_net", "visual": "visual_net"}


def t(x):
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- golden values P1-P5
def test_p1_one_tensor():
    g_mm, g_u = t([1, 0, 0.5]), t([-1, 2, 0])
    w_mm, w_u = pareto_weights(g_mm, g_u)
    assert w_mm == pytest.approx(6 / 8.25, abs=1e-12) and w_u == pytest.approx(1 - 6 / 8.25, abs=1e-12)
    (final,) = mmpareto_combine([g_mm], [g_u])
    torch.testing.assert_close(final, t([1.762018, 2.114422, 1.409614]), atol=1e-6, rtol=0)
    assert float(final.norm()) == pytest.approx(3.092329, abs=1e-6)


def test_p2_rescale_is_per_tensor():
    a, b = mmpareto_combine([t([1, 0]), t([2])], [t([-1, 1]), t([-0.5])])
    w_mm, _ = pareto_weights(t([1, 0, 2]), t([-1, 1, -0.5]))
    assert w_mm == pytest.approx(4.25 / 11.25, abs=1e-12)
    torch.testing.assert_close(a, t([-0.733333, 1.866667]), atol=1e-6, rtol=0)
    torch.testing.assert_close(b, t([2.25]), atol=1e-6, rtol=0)


def test_p3_no_conflict():
    assert pareto_weights(t([1, 1]), t([2, 0])) == (0.5, 0.5)
    torch.testing.assert_close(mmpareto_combine([t([1, 1])], [t([2, 0])])[0], t([4.5, 1.5]))


def test_p4_degenerate_zero_multimodal_gradient():
    assert pareto_weights(t([0, 0]), t([3, 4])) == pytest.approx((0.999, 0.001), abs=1e-12)
    torch.testing.assert_close(mmpareto_combine([t([0, 0])], [t([3, 4])])[0], t([4.5, 6.0]))


def test_p5_package_edge_cases():
    assert pareto_weights(t([1, 0]), t([0, 2])) == pytest.approx((0.8, 0.2), abs=1e-12)
    torch.testing.assert_close(mmpareto_combine([t([1, 0])], [t([0, 2])])[0], t([3.0, 1.5]))
    assert pareto_weights(t([0, 0]), t([0, 0])) == pytest.approx((0.999, 0.001), abs=1e-12)
    final = mmpareto_combine([t([0, 0])], [t([0, 0])])[0]
    assert torch.equal(final, t([0, 0]))


def test_clip_case_v12_ge_v22():
    # conflict with v12 >= v22 needs v12 <= 0 and v22 == 0: g_u = 0
    assert pareto_weights(t([1, 2]), t([0, 0])) == pytest.approx((0.001, 0.999), abs=1e-12)


def test_combine_keeps_dtype_and_validates():
    out = mmpareto_combine([torch.tensor([1.0, 0.0])], [torch.tensor([0.0, -1.0])], gamma=2.0)
    assert out[0].dtype == torch.float32
    with pytest.raises(ValueError, match="`gamma` must be a finite float > 0, got 0"):
        mmpareto_combine([t([1])], [t([1])], gamma=0)
    with pytest.raises(ValueError, match="non-empty lists of equal length, got 1 and 2"):
        mmpareto_combine([t([1])], [t([1]), t([2])])
    with pytest.raises(
        ValueError, match=re.escape("`g_mm[0]` and `g_u[0]` must have the same shape, got (1,) and (2,)")
    ):
        mmpareto_combine([t([1])], [t([1, 2])])
    with pytest.raises(ValueError, match="must be finite"):
        pareto_weights(t([math.nan]), t([1]))


# ---------------------------------------------------------------------------------------------- P6: official procedure
def official_mmpareto_step(model: ParetoTiny, batch, gamma: float = 1.5) -> dict:
    """An independent re-statement of the official step: three recorded backward passes, then a fourth for the sum."""
    (x_a, x_v), y = batch
    a, v = model.audio_net(x_a), model.visual_net(x_v)
    out, out_a, out_v = model.head(torch.cat((a, v), 1)), model.head_audio(a), model.head_video(v)
    ce = nn.functional.cross_entropy
    losses = {"mm": ce(out, y), "audio": ce(out_a, y), "visual": ce(out_v, y)}
    named = dict(model.named_parameters())

    def tokens(name):
        return re.split(r"[_.]", name)

    recorded = {}
    for key, loss in losses.items():
        model.zero_grad()
        loss.backward(retain_graph=True)
        recorded[key] = {
            n: p.grad.clone()
            for n, p in named.items()
            if "head" not in tokens(n) and p.grad is not None and {"audio", "visual"} & set(tokens(n))
        }
    model.zero_grad()
    info = {}
    for m in ("audio", "visual"):
        names = [n for n in recorded[m] if m in tokens(n)]
        g_mm = torch.cat([recorded["mm"][n].flatten() for n in names])
        g_u = torch.cat([recorded[m][n].flatten() for n in names])
        cos = nn.functional.cosine_similarity(g_mm, g_u, dim=0)
        if cos > 0:
            w = (0.5, 0.5)
        else:
            v11, v12, v22 = g_mm @ g_mm, g_mm @ g_u, g_u @ g_u
            if v12 >= v11:
                gam = 0.999
            elif v12 >= v22:
                gam = 0.001
            else:
                gam = float((v22 - v12) / (v11 + v22 - 2 * v12))
            w = (gam, 1 - gam)
        info[m] = {"cos": float(cos), "w": w, "names": names, "g_mm": g_mm, "g_u": g_u}
    (losses["mm"] + losses["audio"] + losses["visual"]).backward()
    for m in ("audio", "visual"):
        w_mm, w_u = info[m]["w"]
        for n in info[m]["names"]:
            p = named[n]
            new = 2 * w_mm * recorded["mm"][n] + 2 * w_u * recorded[m][n]
            r = p.grad.norm() / new.norm()
            p.grad = gamma * r * new if r > 1 else gamma * new
    return info


class CaptureCallback(MMPareto):
    """Records the per-encoder products and weights the callback computed."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.products = []
        self.g_mm = None

    def _encoder_products(self, trainer):
        assert self._buf is not None
        self.g_mm = self._buf[0].clone()
        out = super()._encoder_products(trainer)
        self.products.append(out)
        return out


def _one_step(cb, model, batch, **kw):
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[cb], max_steps=1, **kw))
    trainer.fit(model, train_dataloaders=DataLoader([batch], batch_size=None))
    return trainer


def _batch(n=6, seed=0):
    d = PairData(n, seed)
    return (d.x_a, d.x_v), d.y


def test_p6_one_step_matches_official():
    batch = _batch()
    model, ref = ParetoTiny(), ParetoTiny()
    info = official_mmpareto_step(ref, batch)
    assert info["audio"]["cos"] <= 0 < info["visual"]["cos"]  # one encoder conflicts, the other does not
    cb = CaptureCallback(encoders=ENCODERS)
    trainer = _one_step(cb, model, batch)
    products = cb.products[0]
    enc_names = [n for n, _ in model.named_parameters() if n.startswith(("audio_net", "visual_net"))]
    torch.testing.assert_close(cb.g_mm, torch.cat([info[m]["g_mm"] for m in ("audio", "visual")]), atol=1e-12, rtol=0)
    for m in ("audio", "visual"):
        assert products[m].cos == pytest.approx(info[m]["cos"], abs=1e-10)
        assert products[m].weights() == pytest.approx(info[m]["w"], abs=1e-10)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(model.captured[name], p.grad, atol=1e-10, rtol=0, msg=name)
    assert set(enc_names) <= set(model.captured)
    metrics = trainer.callback_metrics
    assert float(metrics["mmbalance/mmpareto/conflict/audio"]) == 1.0
    assert float(metrics["mmbalance/mmpareto/conflict/visual"]) == 0.0
    assert float(metrics["mmbalance/mmpareto/w_mm/visual"]) == 0.5
    # the heads got exactly the plain summed-loss gradients, and one SGD step gives the same parameters
    torch.optim.SGD(ref.parameters(), lr=2e-3, momentum=0.9, weight_decay=1e-4).step()
    assert_states_close(model.state_dict(), ref.state_dict(), atol=1e-10)


def test_heads_keep_plain_gradients():
    batch = _batch()
    model, plain = ParetoTiny(), ParetoTiny()
    _one_step(MMPareto(encoders=ENCODERS), model, batch)
    out = plain(batch)
    ce = nn.functional.cross_entropy
    (ce(out.logits, out.targets) + sum(ce(z, out.targets) for z in out.unimodal_logits.values())).backward()
    for name, p in plain.named_parameters():
        if name.startswith("head"):
            torch.testing.assert_close(model.captured[name], p.grad, atol=0, rtol=0)


def test_sliced_heads_tiny_model():
    """With heads sliced from the fusion layer (TinyModel), the encoder gradient is the combination of g_mm, g_u."""
    cb = CaptureCallback()
    data = TinyData(batch_size=8)
    batch = next(iter(data.train_dataloader()))

    class Capture(TinyModel):
        def on_before_optimizer_step(self, optimizer):
            self.captured = {n: p.grad.clone() for n, p in self.named_parameters()}

    model = Capture()
    _one_step(cb, model, batch)
    ref = Capture()
    out = ref(batch)
    ce = nn.functional.cross_entropy
    for m in ("a", "b"):
        params = list(ref.encoders[m].parameters())
        g_mm = torch.autograd.grad(ce(out.logits, out.targets), params, retain_graph=True)
        g_u = torch.autograd.grad(ce(out.unimodal_logits[m], out.targets), params, retain_graph=True)
        expected = mmpareto_combine(g_mm, g_u)
        for (name, _), e in zip(ref.encoders[m].named_parameters(), expected, strict=True):
            torch.testing.assert_close(model.captured[f"encoders.{m}.{name}"], e, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------- Lightning machinery
def _fit(callbacks, model=None, data=None, **kw):
    trainer = pl.Trainer(**trainer_kwargs(callbacks=callbacks, **kw))
    model = model or ParetoTiny(batchnorm=False)
    trainer.fit(model, datamodule=data or PairDataModule(n=12, batch_size=6))
    return trainer, model


class SaveGrads(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.save(dict(pl_module.captured), self.folder / f"grads{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_ddp_p6_first_step_equals_official(tmp_path):
    """2 ranks x 3 give the official gradient of the batch of 6 (no BatchNorm: per-rank statistics would differ)."""
    cbs = [MMPareto(encoders=ENCODERS), SaveGrads(tmp_path)]
    _fit(cbs, data=PairDataModule(6, 3), strategy="ddp_fork", devices=2, max_steps=1)
    ref = ParetoTiny(batchnorm=False)
    info = official_mmpareto_step(ref, _batch())
    assert info["audio"]["cos"] <= 0 or info["visual"]["cos"] <= 0
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        for name, p in ref.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, atol=1e-10, rtol=0, msg=name)


class Float(ParetoTiny):
    def __init__(self):
        super().__init__(batchnorm=False)
        self.float()

    def forward(self, batch):
        (x_a, x_v), y = batch
        return super().forward(((x_a.float(), x_v.float()), y))


def test_fp16_grad_scaler_undoes_the_scale():
    """Under a GradScaler g_mm is taken from the scaled loss and unscaled: same result as fp32 up to fp16 rounding."""
    from lightning.pytorch.plugins import MixedPrecision

    cb32, cb16 = CaptureCallback(encoders=ENCODERS), CaptureCallback(encoders=ENCODERS)
    batch = _batch()
    fbatch = ((batch[0][0].float(), batch[0][1].float()), batch[1])
    _one_step(cb32, Float(), fbatch)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _one_step(cb16, Float(), fbatch, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    torch.testing.assert_close(cb16.g_mm, cb32.g_mm, atol=5e-3, rtol=5e-2)
    assert float(cb16.g_mm.abs().max()) < 10  # not left multiplied by the 4096 scale


def test_three_modalities_logs_and_weights():
    dims = {"a": 4, "b": 6, "c": 3}
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[MMPareto()], max_steps=2))
    trainer.fit(TinyModel(dims=dims), datamodule=TinyData(dims=dims))
    for q in ("cos", "w_mm", "conflict", "grad_norm_ratio"):
        for m in dims:
            assert f"mmbalance/mmpareto/{q}/{m}" in trainer.callback_metrics
    assert float(trainer.callback_metrics["mmbalance/mmpareto/grad_norm_ratio/a"]) >= 1.5 - 1e-6


def test_state_key_and_state():
    assert MMPareto(gamma=1.5).state_key != MMPareto(gamma=2.0).state_key
    cb = MMPareto()
    cb.load_state_dict(copy.deepcopy(cb.state_dict()))
