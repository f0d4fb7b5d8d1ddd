import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from lightning_mmbalance import OGMGE, MultimodalOutput, multimodal_loss
from lightning_mmbalance.callbacks.base import in_window
from lightning_mmbalance.functional import ogm_coefficients, ogm_scores
from lightning_mmbalance.functional.ogm_ge import _ogm_noise_seed
from tests.helpers.tiny import SaveParams, TinyData, TinyModel, assert_states_close, load_ranks, trainer_kwargs
from tests.helpers.tiny import fit as _fit

# --------------------------------------------------------------------------------- golden values O1-O3
PHI_A = [[1, 0], [0.5, 1], [0, 2]]
PHI_V = [[0.2, 0.1], [0, 0.3], [0.1, 0]]
W = [[1, -1, 0.5, 0], [-0.5, 1, 0, 0.5], [0, 0.5, -0.5, 1]]
B = [0.1, -0.2, 0.3]


def _o1_logits():
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    w, b = t(W), t(B)
    return {"audio": t(PHI_A) @ w[:, :2].T + b / 2, "visual": t(PHI_V) @ w[:, 2:].T + b / 2}


def test_o1_scores_and_coefficients():
    z = _o1_logits()
    expected_a = [[1.05, -0.6, 0.15], [-0.45, 0.65, 0.65], [-1.95, 1.9, 1.15]]
    torch.testing.assert_close(z["audio"], torch.tensor(expected_a, dtype=torch.float64))
    scores = ogm_scores(z, torch.tensor([0, 1, 1]))
    assert float(scores["audio"]) == pytest.approx(1.723699, abs=1e-6)
    assert float(scores["visual"]) == pytest.approx(0.931614, abs=1e-6)
    assert scores["audio"].dtype == torch.float64 and scores["audio"].ndim == 0
    for alpha, k_a in [(0.1, 0.817060), (0.3, 0.495691), (0.8, 0.098498)]:
        k = ogm_coefficients(scores, alpha)
        assert k["audio"] == pytest.approx(k_a, abs=1e-6) and k["visual"] == 1.0


@pytest.mark.parametrize(("alpha", "jump", "at_two"), [(0.1, 0.900, 0.803), (0.3, 0.709, 0.463), (0.8, 0.336, 0.078)])
def test_o2_coefficient_shape(alpha, jump, at_two):
    assert ogm_coefficients({"a": 1.0, "v": 1.0 + 1e-12}, alpha)["v"] == pytest.approx(jump, abs=5e-4)
    assert ogm_coefficients({"a": 1.0, "v": 2.0}, alpha)["v"] == pytest.approx(at_two, abs=5e-4)


def test_o2_tie_damps_the_first():
    assert ogm_coefficients({"a": 2.5, "v": 2.5}, 0.1) == pytest.approx({"a": 0.900332, "v": 1.0}, abs=1e-6)
    assert ogm_coefficients({"v": 2.5, "a": 2.5}, 0.1) == pytest.approx({"v": 0.900332, "a": 1.0}, abs=1e-6)
    assert ogm_coefficients({"a": 0.0, "v": 0.0}, 0.1)["a"] == pytest.approx(0.900332, abs=1e-6)


def test_o3_more_modalities():
    k = lambda s: list(ogm_coefficients(dict(zip("xyz", s, strict=False)), 0.1).values())  # noqa: E731
    assert k((3, 1, 2)) == pytest.approx([0.802625, 1, 1], abs=1e-6)
    assert k((4, 1, 1)) == pytest.approx([0.620051, 1, 1], abs=1e-6)
    assert k((2, 2, 2)) == pytest.approx([0.900332, 1, 1], abs=1e-6)
    assert k((1.723699, 0.931614)) == pytest.approx([0.817060, 1], abs=1e-6)


def test_zero_scores_give_infinite_ratio():
    assert ogm_coefficients({"a": 0.0, "v": 1.0}, 0.1) == {"a": 1.0, "v": 0.0}


def test_official_two_modality_rule_equivalence():
    """The N-modality rule reduces to the official rho = S_v / S_a rule for random scores."""
    g = torch.Generator().manual_seed(0)
    for s_a, s_v in torch.rand(200, 2, generator=g).tolist():
        rho_v = s_v / s_a
        official = (1.0, 1 - math.tanh(0.3 * rho_v)) if rho_v > 1 else (1 - math.tanh(0.3 / rho_v), 1.0)
        got = ogm_coefficients({"a": s_a, "v": s_v}, 0.3)
        assert (got["a"], got["v"]) == pytest.approx(official, rel=1e-12)


def test_functional_errors():
    z = _o1_logits()
    with pytest.raises(ValueError, match="at least 2 modalities"):
        ogm_coefficients({"a": 1.0}, 0.1)
    with pytest.raises(ValueError, match=r"finite and >= 0, got \{'a': -1.0\}"):
        ogm_coefficients({"a": -1.0, "v": 1.0}, 0.1)
    with pytest.raises(ValueError, match="`alpha` must be a finite float >= 0, got -0.1"):
        ogm_coefficients({"a": 1.0, "v": 1.0}, -0.1)
    with pytest.raises(ValueError, match="one common B and C"):
        ogm_scores({"a": z["audio"], "v": z["visual"][:2]}, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="1-D integer tensor of length 3"):
        ogm_scores(z, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"lie in \[0, 3\), got \[0, 5\]"):
        ogm_scores(z, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="is empty"):
        ogm_scores({}, torch.tensor([0]))


# ---------------------------------------------------------------------------------------------- O4: official loop body
def _encoder(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4)
    )


class Fusion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc_out = nn.Linear(8, 3)


class OfficialTiny(pl.LightningModule):
    """The O4 model of the golden values: conv encoders with BN, concat head, bias split in half; float64."""

    def __init__(self, tie: bool = False, lr: float = 1e-3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.audio_net = _encoder(1)
        self.visual_net = _encoder(1 if tie else 3)
        self.fusion_module = Fusion()
        if tie:  # identical encoders, inputs and head slices: S_a == S_v exactly
            self.visual_net.load_state_dict(self.audio_net.state_dict())
            with torch.no_grad():
                self.fusion_module.fc_out.weight[:, 4:] = self.fusion_module.fc_out.weight[:, :4]
        self.lr = lr
        self.captured: dict[str, torch.Tensor] = {}
        self.double()

    def forward(self, batch):
        (x_a, x_v), y = batch
        a, v = self.audio_net(x_a), self.visual_net(x_v)
        fc = self.fusion_module.fc_out
        out = fc(torch.cat((a, v), 1))
        uni = {
            "audio": a @ fc.weight[:, :4].T + fc.bias / 2,
            "visual": v @ fc.weight[:, 4:].T + fc.bias / 2,
        }
        return MultimodalOutput(out, uni, y)

    def training_step(self, batch, batch_idx):
        return multimodal_loss(self, self(batch))

    def on_before_optimizer_step(self, optimizer):  # runs after the callbacks' hook
        self.captured = {n: p.grad.clone() for n, p in self.named_parameters()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)


def _o4_batch(tie: bool = False):
    g = torch.Generator().manual_seed(1)
    x_a = torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64)
    x_v = x_a.clone() if tie else torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    return (x_a, x_v), torch.tensor([0, 1, 2, 1])


def official_step(model: OfficialTiny, batch, alpha: float, noise_draws=None):
    """An independent re-statement of the official training-step body (main.py, CVPR version)."""
    model.zero_grad()
    (x_a, x_v), y = batch
    a, v = model.audio_net(x_a), model.visual_net(x_v)
    fc = model.fusion_module.fc_out
    out = fc(torch.cat((a, v), 1))
    nn.functional.cross_entropy(out, y).backward()
    out_a = a @ fc.weight[:, :4].T + fc.bias / 2
    out_v = v @ fc.weight[:, 4:].T + fc.bias / 2
    score_a = torch.softmax(out_a, 1)[torch.arange(len(y)), y].sum()
    score_v = torch.softmax(out_v, 1)[torch.arange(len(y)), y].sum()
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        coeff_v, coeff_a = 1 - torch.tanh(alpha * torch.relu(ratio_v)), 1.0
    else:
        coeff_a, coeff_v = 1 - torch.tanh(alpha * torch.relu(ratio_a)), 1.0
    sigmas = {}
    for name, p in nn.ModuleDict({"module": model}).named_parameters():
        part = name.split(".")[1]
        if p.grad is None or p.grad.ndim != 4 or ("audio" not in part and "visual" not in part):
            continue
        k = coeff_a if "audio" in part else coeff_v
        if noise_draws is None:
            p.grad = p.grad * k
        else:
            sigma = p.grad.std().item() + 1e-8
            sigmas[name] = sigma
            p.grad = p.grad * k + sigma * noise_draws.pop(0)
    return {"score_a": score_a, "score_v": score_v, "k_a": float(coeff_a), "k_v": float(coeff_v), "sigmas": sigmas}


def _fit_one_step(cb, model, batch, epoch_window=None):
    loader = DataLoader([batch], batch_size=None)
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[cb], max_steps=1))
    trainer.fit(model, train_dataloaders=loader)
    return trainer


def _noise_draws(model, seed, step=0):
    """The callback's draws: one standard normal per selected tensor, audio encoder then visual, in order."""
    g = OGMGE(seed=seed)._generator(torch.device("cpu"), step)
    shapes = [p.shape for enc in (model.audio_net, model.visual_net) for p in enc.parameters() if p.ndim == 4]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize("noise", [False, True])
def test_o4_one_step_matches_official(noise):
    batch = _o4_batch()
    model, ref = OfficialTiny(), OfficialTiny()
    plain = OfficialTiny()
    official = official_step(ref, batch, 0.3, _noise_draws(ref, seed=3) if noise else None)
    official_step(plain, batch, 0.0)  # alpha 0, no noise: the plain gradient (k = 1)
    cb = OGMGE(
        alpha=0.3, noise=noise, param_filter="conv", seed=3, encoders={"audio": "audio_net", "visual": "visual_net"}
    )
    trainer = _fit_one_step(cb, model, batch)
    metrics = trainer.callback_metrics
    assert float(metrics["mmbalance/ogm_ge/score/audio"]) == pytest.approx(float(official["score_a"]) / 4, rel=1e-6)
    assert float(metrics["mmbalance/ogm_ge/coefficient/audio"]) == pytest.approx(official["k_a"], rel=1e-6)
    assert float(metrics["mmbalance/ogm_ge/coefficient/visual"]) == pytest.approx(official["k_v"], rel=1e-6)
    assert min(official["k_a"], official["k_v"]) < 1  # something is damped
    for name, p in ref.named_parameters():
        torch.testing.assert_close(model.captured[name], p.grad, rtol=0, atol=1e-12, msg=name)
        modulated = p.ndim == 4 and ("audio" in name or "visual" in name)
        k = official["k_a"] if name.startswith("audio") else official["k_v"]
        if not modulated:  # conv bias, BN, the encoder's Linear and fc_out: bit-identical to the plain gradient
            torch.testing.assert_close(model.captured[name], dict(plain.named_parameters())[name].grad, rtol=0, atol=0)
        elif noise:
            ge = model.captured[name] - k * dict(plain.named_parameters())[name].grad
            assert ge.abs().max() > 0
            sigma = official["sigmas"]["module." + name]
            assert sigma == pytest.approx(float(dict(plain.named_parameters())[name].grad.std()) + 1e-8, rel=1e-12)
    # one SGD(1e-3, momentum 0.9, wd 1e-4) step: the same parameters (weight decay is not scaled by k)
    torch.optim.SGD(ref.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4).step()
    assert_states_close(model.state_dict(), ref.state_dict(), atol=1e-12)


def test_o4_tie_damps_the_first_modality():
    batch = _o4_batch(tie=True)
    model = OfficialTiny(tie=True)
    out = model(batch)
    scores = ogm_scores(out.unimodal_logits, out.targets)
    assert float(scores["audio"]) == float(scores["visual"])
    cb = OGMGE(alpha=0.1, noise=False, param_filter="conv", encoders={"audio": "audio_net", "visual": "visual_net"})
    trainer = _fit_one_step(cb, model, batch)
    assert float(trainer.callback_metrics["mmbalance/ogm_ge/coefficient/audio"]) == pytest.approx(0.900332, abs=1e-6)
    assert float(trainer.callback_metrics["mmbalance/ogm_ge/coefficient/visual"]) == 1.0


def test_o4_outside_window_untouched_and_no_draw(monkeypatch):
    batch = _o4_batch()
    model, plain = OfficialTiny(), OfficialTiny()
    official_step(plain, batch, 0.0)
    cb = OGMGE(
        alpha=0.3, modulation_starts=1, param_filter="conv", encoders={"audio": "audio_net", "visual": "visual_net"}
    )
    draws = []
    monkeypatch.setattr(cb, "_generator", lambda *a: draws.append(a))
    trainer = _fit_one_step(cb, model, batch)
    assert draws == []
    for name, p in plain.named_parameters():
        torch.testing.assert_close(model.captured[name], p.grad, rtol=0, atol=0)
    assert float(trainer.callback_metrics["mmbalance/ogm_ge/coefficient/audio"]) == 1.0
    assert float(trainer.callback_metrics["mmbalance/ogm_ge/coefficient/visual"]) == 1.0


def test_noise_statistics():
    """G_new - k G_old is N(0, sigma^2) per tensor with sigma the unbiased std of G_old (+1e-8)."""

    class Wide(TinyModel):
        def __init__(self):
            super().__init__(dims={"a": 400, "b": 300}, feature_dim=50)

        def on_before_optimizer_step(self, optimizer):
            self.captured = {n: p.grad.clone() for n, p in self.named_parameters()}

    model, plain = Wide(), Wide()
    data = TinyData(n=16, batch_size=16, dims={"a": 400, "b": 300})
    cb = OGMGE(alpha=0.0, noise=True)
    pl.Trainer(**trainer_kwargs(callbacks=[cb], max_steps=1)).fit(model, datamodule=data)
    pl.Trainer(**trainer_kwargs(max_steps=1)).fit(plain, datamodule=data)
    assert cb._filter is not None
    for name, g in plain.captured.items():
        noise = model.captured[name] - g  # alpha = 0: k = 1 for every modality
        if name.startswith("encoders") and g.ndim >= 2:
            sigma = float(g.std()) + 1e-8
            assert float(noise.std()) == pytest.approx(sigma, rel=0.08)
            assert abs(float(noise.mean())) < 4 * sigma / math.sqrt(noise.numel())
        else:
            assert torch.equal(noise, torch.zeros_like(noise)), name


# ---------------------------------------------------------------------------------------------- Lightning machinery
@pytest.mark.ddp
def test_ddp_equals_one_process_with_double_batch(tmp_path):
    cb = OGMGE(alpha=0.5, noise=False)
    _fit([cb, SaveParams(tmp_path)], data=TinyData(batch_size=4), strategy="ddp_fork", devices=2, max_epochs=2)
    rank0, _ = load_ranks(tmp_path)
    _, single = _fit([OGMGE(alpha=0.5, noise=False)], data=TinyData(batch_size=8), max_epochs=2)
    _, plain = _fit([], data=TinyData(batch_size=8), max_epochs=2)
    assert_states_close(rank0, single.state_dict(), atol=1e-10)
    assert not torch.allclose(single.encoders["a"][0].weight, plain.encoders["a"][0].weight)


def test_adam_update_mode_scales_the_update():
    """In update mode the damped encoder's update is k times the plain Adam update."""
    model = TinyModel(optimizer="adam", lr=0.01)
    before = copy.deepcopy(model.state_dict())
    trainer, _ = _fit([OGMGE(alpha=0.5, noise=False, modulate="update")], model=model, max_steps=1)
    plain = TinyModel(optimizer="adam", lr=0.01)
    _fit([], model=plain, max_steps=1)
    k = {m: float(trainer.callback_metrics[f"mmbalance/ogm_ge/coefficient/{m}"]) for m in ("a", "b")}
    assert min(k.values()) < 1
    for name, p in model.state_dict().items():
        m = name.split(".")[1] if name.startswith("encoders") else None
        factor = k[m] if m is not None and name.endswith("weight") else 1.0
        ratio = (p - before[name]) / (plain.state_dict()[name] - before[name])
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.flatten()[0])), atol=0, rtol=1e-9)
        assert float(ratio.flatten()[0]) == pytest.approx(factor, rel=1e-6)  # the logged k is float32


def test_bf16_true_smoke():
    class Float(TinyModel):
        def __init__(self):
            super().__init__()
            self.float()

    trainer, model = _fit([OGMGE(alpha=0.5)], model=Float(), precision="bf16-true", max_epochs=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "mmbalance/ogm_ge/coefficient/a" in trainer.callback_metrics


def test_three_modalities_and_logs():
    dims = {"a": 4, "b": 6, "c": 3}
    trainer, _ = _fit([OGMGE(alpha=0.5)], model=TinyModel(dims=dims), data=TinyData(dims=dims), max_steps=2)
    for q in ("score", "ratio", "coefficient"):
        for m in dims:
            assert f"mmbalance/ogm_ge/{q}/{m}" in trainer.callback_metrics


def test_filter_selecting_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"`param_filter='conv'` selects no tensor of the 'a' encoder.*'weights'"):
        _fit([OGMGE(param_filter="conv")])


def test_callable_filter_and_state_key():
    def biases_only(name, p):
        return name.endswith("bias")

    cb = OGMGE(param_filter=biases_only)
    _fit([cb], max_steps=1)
    assert all(p.ndim == 1 for ps in cb._selected.values() for p in ps)
    assert "biases_only" in cb.state_key and OGMGE(alpha=0.2).state_key != OGMGE(alpha=0.3).state_key


def test_requires_unimodal_logits():
    class NoUni(TinyModel):
        def forward(self, batch):
            out = super().forward(batch)
            out.unimodal_logits = {}
            return out

    with pytest.raises(ValueError, match="OGMGE needs per-modality logits"):
        _fit([OGMGE()], model=NoUni())


def test_deepspeed_like_strategy_refused():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    with pytest.raises(MisconfigurationException, match="OGMGE does not support DeepSpeed"):
        OGMGE()._check_strategy(SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy)))


def check_noise_seeds(device: torch.device) -> None:
    """On ``device``: one seed repeats its noise; two seeds, or two steps, draw different noise."""

    def draw(seed: int, step: int) -> torch.Tensor:
        return torch.randn(8, generator=OGMGE(seed=seed)._generator(device, step), device=device)

    torch.testing.assert_close(draw(0, 5), draw(0, 5), rtol=0, atol=0)
    draws = [draw(0, 5), draw(1, 5), draw(2**31 - 1, 5), draw(0, 6)]
    for i, a in enumerate(draws):
        for b in draws[i + 1 :]:
            assert not torch.equal(a, b)


def test_noise_seed_matters_and_repeats_on_cpu():
    check_noise_seeds(torch.device("cpu"))


def test_noise_seed_keeps_low_32_bits_distinct():
    """Torch's CPU generator keeps the low 32 bits of a seed: they differ between seeds and between steps."""
    low = {_ogm_noise_seed(seed, step) % 2**32 for seed in range(20) for step in range(20)}
    assert len(low) == 400
    assert all(0 <= _ogm_noise_seed(s, 7) < 2**63 for s in (0, 2**31 - 1))


def test_noise_differs_between_seeds_in_training():
    """The `seed` argument changes the trained parameters (on CPU it used not to)."""
    _, first = _fit([OGMGE(alpha=0.5, seed=0)], max_steps=2)
    _, again = _fit([OGMGE(alpha=0.5, seed=0)], max_steps=2)
    _, other = _fit([OGMGE(alpha=0.5, seed=1)], max_steps=2)
    assert_states_close(first.state_dict(), again.state_dict(), atol=0)
    assert not torch.equal(first.encoders["a"][0].weight, other.encoders["a"][0].weight)


# ---------------------------------------------------------------------------------------------- P6: the journal's OGM
@pytest.mark.parametrize(
    ("alpha", "damped"), [(0.1, 0.9003320053750442), (0.8, 0.33596322973215087), (2.6, 0.010972597798900807)]
)
def test_p6_tie_rules(alpha, damped):
    scores = {"audio": 2.0, "visual": 2.0}
    assert ogm_coefficients(scores, alpha) == pytest.approx({"audio": damped, "visual": 1.0}, abs=1e-12)
    assert ogm_coefficients(scores, alpha, tie="first") == ogm_coefficients(scores, alpha)
    assert ogm_coefficients(scores, alpha, tie="last") == pytest.approx({"audio": 1.0, "visual": damped}, abs=1e-12)
    three = ogm_coefficients({"x": 1.0, "y": 1.0, "z": 1.0}, alpha, tie="last")
    assert three == pytest.approx({"x": 1.0, "y": 1.0, "z": damped}, abs=1e-12)


def test_p6_unequal_scores_ignore_the_tie_rule():
    scores = {"audio": 1.723699, "visual": 0.931614}
    expected = {"audio": 0.0984977328511687, "visual": 1.0}
    for tie in ("first", "last"):
        assert ogm_coefficients(scores, 0.8, tie=tie) == pytest.approx(expected, abs=1e-12)
    g = torch.Generator().manual_seed(1)
    for s_a, s_v in torch.rand(100, 2, generator=g).tolist():
        assert ogm_coefficients({"a": s_a, "v": s_v}, 0.3, "first") == ogm_coefficients(
            {"a": s_a, "v": s_v}, 0.3, "last"
        )


def test_p6_journal_window():
    """Journal warm-up (epochs <= 5 off) with window 0-60 is `modulation_starts=6, modulation_ends=60`."""
    journal = OGMGE(alpha=0.8, modulation_starts=6, modulation_ends=60, tie="last", param_filter="conv")
    window = journal.modulation_starts, journal.modulation_ends
    assert [in_window(e, *window) for e in (0, 5, 6, 60, 61)] == [False, False, True, True, False]


def test_o4_tie_last_damps_the_second_modality():
    batch = _o4_batch(tie=True)
    model = OfficialTiny(tie=True)
    cb = OGMGE(
        alpha=0.1, noise=False, param_filter="conv", tie="last", encoders={"audio": "audio_net", "visual": "visual_net"}
    )
    trainer = _fit_one_step(cb, model, batch)
    assert float(trainer.callback_metrics["mmbalance/ogm_ge/coefficient/audio"]) == 1.0
    assert float(trainer.callback_metrics["mmbalance/ogm_ge/coefficient/visual"]) == pytest.approx(0.900332, abs=1e-6)


def test_tie_argument_and_state_key():
    with pytest.raises(ValueError, match=r"`tie` must be one of \('first', 'last'\), got 'middle'"):
        OGMGE(tie="middle")
    with pytest.raises(ValueError, match=r"`tie` must be one of \('first', 'last'\), got 'none'"):
        ogm_coefficients({"a": 1.0, "v": 1.0}, 0.1, tie="none")
    assert OGMGE().state_key == OGMGE(tie="first").state_key != OGMGE(tie="last").state_key
    assert "tie" not in OGMGE().state_key  # checkpoints of older versions keep their key
