"""OPM: golden values of the functional core (spec P1-P5), the callback end to end (P7), and its errors."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

import lightning_mmbalance.callbacks.opm as opm_module
from lightning_mmbalance import OPM, ConcatFusion, MultimodalOutput, multimodal_loss
from lightning_mmbalance.callbacks.base import in_window
from lightning_mmbalance.functional import (
    ogm_scores,
    opm_drop_features,
    opm_drop_probabilities,
    opm_generator,
    opm_keep_masks,
    opm_theta,
)
from lightning_mmbalance.masking import MaskingError
from tests.helpers.tiny import SaveParams, TinyData, TinyModel, assert_states_close, fit, load_ranks, trainer_kwargs

F64 = torch.float64
Q_20_10 = 0.6903985389889412


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# --------------------------------------------------------------------------------------------- P1, P2: probabilities
@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ((20, 10), (Q_20_10, 0)),
        ((10, 20), (0, Q_20_10)),
        ((12, 10), (0.549343830056226, 0)),
        ((10, 10), (0, 0)),
        ((10, 0), (0.75, 0)),
        ((0, 0), (0, 0)),
    ],
)
def test_p1_drop_probabilities(scores, expected):
    q = opm_drop_probabilities(dict(zip(("audio", "visual"), map(float, scores), strict=True)))
    assert list(q.values()) == pytest.approx(expected, abs=1e-10)
    assert list(q) == ["audio", "visual"]


def test_p1_theta_clip_and_config_default():
    q = opm_drop_probabilities({"audio": 20.0, "visual": 10.0})
    theta = opm_theta(q, {"audio": 512, "visual": 512})
    assert theta == pytest.approx(0.3451992694944706, abs=1e-10)
    assert 1 / (1 - theta) == pytest.approx(1.5271821691890362, abs=1e-10)
    assert opm_theta(q) == theta  # equal widths and no widths agree
    clipped = opm_drop_probabilities({"a": 30.0, "v": 10.0}, q_base=0.8, lam=0.5)
    assert 0.8 * (1 + 0.5 * math.tanh(2)) == pytest.approx(1.1856110320303268, abs=1e-12)
    assert clipped == {"a": 1.0, "v": 0.0}
    assert opm_theta(clipped) == 0.5
    assert opm_drop_probabilities({"a": 20.0, "v": 10.0}, q_base=0.4)["a"] == pytest.approx(
        0.552318831191153, abs=1e-10
    )


def official_calcu_q(s_1: float, s_2: float, q_base: float = 0.5, lam: float = 0.5) -> tuple[float, float]:
    """An independent re-statement of the official ``calcu_q`` (Classifier.py), float64."""
    r_1 = math.tanh(max(s_1 / s_2 - 1, 0.0)) if s_2 else (1.0 if s_1 else math.nan)
    r_2 = math.tanh(max(s_2 / s_1 - 1, 0.0)) if s_1 else (1.0 if s_2 else math.nan)
    q = [q_base * (1 + lam * r) if r > 0 else 0.0 for r in (r_1, r_2)]
    return min(max(q[0], 0.0), 1.0), min(max(q[1], 0.0), 1.0)


def test_p1_two_modalities_reduce_to_the_official_rule():
    g = torch.Generator().manual_seed(0)
    for s_1, s_2 in [*(32 * torch.rand(300, 2, generator=g, dtype=F64)).tolist(), [3.0, 3.0], [0.0, 4.0]]:
        for q_base, lam in ((0.5, 0.5), (0.4, 0.5), (0.9, 1.0)):
            got = opm_drop_probabilities({"a": s_1, "v": s_2}, q_base, lam)
            assert (got["a"], got["v"]) == official_calcu_q(s_1, s_2, q_base, lam)


def test_p2_three_modalities():
    q = opm_drop_probabilities({"a": 6.0, "b": 6.0, "c": 2.0})
    assert list(q.values()) == pytest.approx([0.6155292893150024, 0.6155292893150024, 0], abs=1e-10)
    theta = opm_theta(q, {"a": 4, "b": 2, "c": 6})
    assert theta == pytest.approx(0.3077646446575012, abs=1e-10)
    assert 1 / (1 - theta) == pytest.approx(1.4445953854888383, abs=1e-10)
    assert list(opm_drop_probabilities({"a": 3.0, "b": 1.0, "c": 2.0}).values()) == pytest.approx(
        [Q_20_10, 0, 0], abs=1e-10
    )


def test_p2_the_weakest_modality_is_never_dropped():
    g = torch.Generator().manual_seed(2)
    for n in range(2, 6):
        for row in torch.rand(200, n, generator=g, dtype=F64).tolist():
            scores = {str(i): s for i, s in enumerate(row)}
            q = opm_drop_probabilities(scores, q_base=1.0, lam=1.0)
            assert q[min(scores, key=scores.__getitem__)] == 0.0
            assert opm_theta(q) < 1


# ---------------------------------------------------------------------------------------------------- P3: one step
PHI_A = [[1, 0], [0.5, 1], [0, 2], [1.5, -0.5]]
PHI_V = [[0.2, 0.1], [0, 0.3], [0.1, 0], [-0.2, 0.4]]
W = [[1, -1, 0.5, 0], [-0.5, 1, 0, 0.5], [0, 0.5, -0.5, 1]]
B = [0.1, -0.2, 0.3]
Y = [0, 1, 1, 0]
KEEP_A = [True, False, True, False]
P3_LOSS = 0.9057048132153784
P3_GRAD_A = [[-0.09697478171289484, 0.14042349208647323], [0, 0], [0.04858892564242485, -0.049021470153349705], [0, 0]]
P3_GRAD_V = [
    [-0.07682005978141869, 0.07682005978141869],
    [-0.04716260438106076, 0.047162604381060784],
    [-0.04685874759872539, 0.04685874759872539],
    [-0.27067859214508466, 0.27067859214508466],
]
P3_GRAD_W = [
    [-0.08689742074715676, 0.0017301780436994574, 0.04550550121556832, -0.10432217853227445],
    [0.02015472193147615, -0.19089534648230044, -0.022839339005415328, -0.05156009123643902],
    [0.06674269881568061, 0.18916516843860098, -0.022666162210152992, 0.15588226976871347],
]
P3_GRAD_B = [-0.1936666540337319, -0.18244645683197944, 0.37611311086571136]


def _p3_step(official_theta_gradient: bool = False):
    phi = {"audio": t(PHI_A).requires_grad_(), "visual": t(PHI_V).requires_grad_()}
    w, b, y = t(W).requires_grad_(), t(B).requires_grad_(), torch.tensor(Y)
    slices = {"audio": slice(0, 2), "visual": slice(2, 4)}
    z = {m: phi[m] @ w.detach()[:, slices[m]].T + b.detach() / 2 for m in phi}  # the official detached copies
    scores = ogm_scores(z, y)
    q = opm_drop_probabilities(scores)
    theta = opm_theta(q, {"audio": 2, "visual": 2})
    keep = {"audio": torch.tensor(KEEP_A), "visual": torch.ones(4, dtype=torch.bool)}
    dropped = opm_drop_features(phi, keep, theta)
    fused = torch.cat([dropped["audio"], dropped["visual"]], 1) @ w.T + b
    loss = nn.functional.cross_entropy(fused, y)
    if official_theta_gradient:  # the official op returns theta as theta's gradient: d(theta^2 / 2)
        s = torch.stack([torch.softmax(z[m], 1)[torch.arange(4), y].sum() for m in phi])
        r_a = torch.tanh(torch.relu(s[0] / s[1] - 1))
        graph_theta = 0.5 * (0.5 * (1 + 0.5 * r_a))  # q_visual is 0: theta = q_audio / 2
        loss = loss + graph_theta.detach() * graph_theta  # its gradient is theta * d(theta)
    loss.backward()
    return {"z": z, "scores": scores, "q": q, "theta": theta, "dropped": dropped, "fused": fused, "loss": loss}, (
        phi,
        w,
        b,
    )


def test_p3_scores_drop_loss_and_gradients():
    out, (phi, w, b) = _p3_step()
    z_a = [[1.05, -0.6, 0.15], [-0.45, 0.65, 0.65], [-1.95, 1.9, 1.15], [2.05, -1.35, -0.1]]
    z_v = [[0.15, -0.05, 0.15], [0.05, 0.05, 0.45], [0.1, -0.1, 0.1], [-0.05, 0.1, 0.65]]
    torch.testing.assert_close(out["z"]["audio"], t(z_a), rtol=0, atol=1e-10)
    torch.testing.assert_close(out["z"]["visual"], t(z_v), rtol=0, atol=1e-10)
    assert float(out["scores"]["audio"]) == pytest.approx(2.5933716314054136, abs=1e-10)
    assert float(out["scores"]["visual"]) == pytest.approx(1.171100902681741, abs=1e-10)
    assert out["q"] == pytest.approx({"audio": 0.7095040771462389, "visual": 0.0}, abs=1e-10)
    assert out["theta"] == pytest.approx(0.35475203857311943, abs=1e-10)
    s = 1.5497918006414653
    torch.testing.assert_close(out["dropped"]["audio"], t([[s, 0], [0, 0], [0, 2 * s], [0, 0]]), rtol=0, atol=1e-10)
    torch.testing.assert_close(out["dropped"]["visual"], t(PHI_V) * s, rtol=0, atol=1e-10)
    fused = [
        [1.8047709807056118, -0.8974063102886594, 0.3],
        [0.1, 0.03246877009621979, 0.7649375401924396],
        [-2.922094011250857, 2.8995836012829304, 1.772302210609392],
        [-0.05497918006414654, 0.10995836012829308, 1.0748959003207328],
    ]
    torch.testing.assert_close(out["fused"], t(fused), rtol=0, atol=1e-10)
    assert float(out["loss"]) == pytest.approx(P3_LOSS, abs=1e-10)
    for got, expected in ((phi["audio"], P3_GRAD_A), (phi["visual"], P3_GRAD_V), (w, P3_GRAD_W), (b, P3_GRAD_B)):
        torch.testing.assert_close(got.grad, t(expected), rtol=0, atol=1e-10)


def test_p3_official_theta_gradient_is_the_documented_extra():
    """The official op adds d(theta^2 / 2) to the features' gradients only; the head's are unchanged."""
    _, (phi, w, b) = _p3_step()
    _, (phi_o, w_o, b_o) = _p3_step(official_theta_gradient=True)
    extra_a = [
        [0.0030643164703469117, -0.004384675116339248],
        [-0.002070039040602043, 0.002414806162687958],
        [-0.0013547750871215763, 0.0014085403743066202],
        [0.0014200460043695812, -0.0020589293065140036],
    ]
    extra_v = [
        [-0.004428412827333722, 0.004428412827333722],
        [-0.0005035089129062087, 0.0005035089129062087],
        [0, 0],
        [-0.0037151703158787575, 0.0037151703158787575],
    ]
    torch.testing.assert_close(phi_o["audio"].grad - phi["audio"].grad, t(extra_a), rtol=0, atol=1e-14)
    torch.testing.assert_close(phi_o["visual"].grad - phi["visual"].grad, t(extra_v), rtol=0, atol=1e-14)
    torch.testing.assert_close(w_o.grad, w.grad, rtol=0, atol=0)
    torch.testing.assert_close(b_o.grad, b.grad, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- P4: gate and masks
P4_U = [
    [0.5571380502062263, 0.8009080868919721],
    [0.9565138174753386, 0.05861516014935442],
    [0.23640069529958085, 0.7878121978721646],
    [0.00030824035715149023, 0.7257230733611507],
    [0.6187666612577356, 0.004051573689837662],
    [0.10830539207922729, 0.13050471177614809],
]


def test_p4_generator_stream():
    rng = opm_generator(0, 1, 0)
    assert rng.random() == pytest.approx(0.8897387912781343, abs=1e-15)
    numpy.testing.assert_allclose(rng.random((6, 2)), P4_U, rtol=0, atol=1e-15)
    for args, u in [
        ((0, 2, 0), 0.08082403917318748),
        ((0, 0, 0), 0.6369616873214543),
        ((1, 0, 0), 0.5118216247002567),
        ((0, 3, 1), 0.03266592647853228),
    ]:
        assert opm_generator(*args).random() == pytest.approx(u, abs=1e-15)


def test_p4_masks_of_two_ranks_interleave_into_one_process():
    q = {"audio": Q_20_10, "visual": 0.0}
    masks = [opm_keep_masks(q, 3, 0.7, opm_generator(0, 1, 0), world_size=2, rank=r) for r in (0, 1)]
    assert [m[0] for m in masks] == [True, True]
    assert masks[0][1]["audio"].tolist() == [False, True, False]
    assert masks[1][1]["audio"].tolist() == [False, True, True]
    executed, single = opm_keep_masks(q, 6, 0.7, opm_generator(0, 1, 0))
    assert executed and single["audio"].tolist() == [False, False, True, True, False, True]
    assert all(m[1]["visual"].all() for m in masks) and single["visual"].all()
    assert single["audio"].dtype == torch.bool and single["audio"].device.type == "cpu"


def test_p4_closed_gate_and_tie_draw_nothing_more():
    q = {"audio": Q_20_10, "visual": 0.0}
    rng = opm_generator(0, 2, 0)
    executed, keep = opm_keep_masks(q, 3, 0.7, rng)
    assert not executed and all(k.all() for k in keep.values())
    follow = opm_generator(0, 2, 0)
    follow.random()
    assert rng.random() == follow.random()  # only u was drawn
    rng = opm_generator(0, 1, 0)
    executed, keep = opm_keep_masks({"audio": 0.0, "visual": 0.0}, 3, 0.7, rng)
    assert executed and all(k.all() for k in keep.values())
    assert rng.random() == pytest.approx(P4_U[0][0], abs=1e-15)  # U was not drawn


# ------------------------------------------------------------------------- P5: BalanceBenchmark's aliasing (docs)
def balancebenchmark_aliased(s_1: float, s_2: float, q_base: float = 0.4, lam: float = 0.5) -> tuple[float, float]:
    """A re-statement of BalanceBenchmark's in-place division: the second ratio divides the already divided first."""
    ratio_1 = s_1 / (s_2 + 1e-5)
    ratio_2 = s_2 / (ratio_1 + 1e-5)
    return tuple(min(q_base * (1 + lam * math.tanh(r - 1)), 1.0) if r > 1 else 0.0 for r in (ratio_1, ratio_2))  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ((20, 10), (0.5523186632013285, 0.5998658545839236)),
        ((10, 20), (0, 0.6000000000000001)),
        ((20, 5), (0.5990109349515926, 0.44898361497798644)),
        ((20, 4), (0.5998658565954033, 0)),
    ],
)
def test_p5_balancebenchmark_aliasing_differs_from_the_package(scores, expected):
    assert balancebenchmark_aliased(*scores) == pytest.approx(expected, abs=1e-10)
    package = opm_drop_probabilities({"a": float(scores[0]), "v": float(scores[1])}, q_base=0.4)
    assert min(package.values()) == 0.0


# ---------------------------------------------------------------------------------------------- functional errors
def test_functional_errors():
    with pytest.raises(ValueError, match="OPM needs at least 2 modalities"):
        opm_drop_probabilities({"a": 1.0})
    with pytest.raises(ValueError, match=r"finite and >= 0, got \{'a': -1.0\}"):
        opm_drop_probabilities({"a": -1.0, "v": 1.0})
    with pytest.raises(ValueError, match=r"finite and >= 0, got \{'v': nan\}"):
        opm_drop_probabilities({"a": 1.0, "v": math.nan})
    with pytest.raises(ValueError, match=r"`q_base` must be a finite float in \[0, 1\], got 1.2"):
        opm_drop_probabilities({"a": 1.0, "v": 2.0}, q_base=1.2)
    with pytest.raises(ValueError, match="`lam` must be a finite float >= 0, got inf"):
        opm_drop_probabilities({"a": 1.0, "v": 2.0}, lam=math.inf)
    with pytest.raises(ValueError, match=r"keys of `feature_dims` \['a'\] differ from the modalities \['a', 'v'\]"):
        opm_theta({"a": 0.5, "v": 0.0}, {"a": 3})
    with pytest.raises(ValueError, match=r"Feature widths must be ints >= 1, got \{'v': 0\}"):
        opm_theta({"a": 0.5, "v": 0.0}, {"a": 3, "v": 0})
    with pytest.raises(ValueError, match=r"Drop probabilities must lie in \[0, 1\], got \{'a': 1.5\}"):
        opm_theta({"a": 1.5, "v": 0.0})
    with pytest.raises(ValueError, match="theta = 1.0 >= 1: every modality would be dropped"):
        opm_theta({"a": 1.0, "v": 1.0})
    with pytest.raises(ValueError, match="`global_step` must be an int >= 0, got -1"):
        opm_generator(0, -1, 0)
    rng = opm_generator(0, 0, 0)
    q = {"a": 0.5, "v": 0.0}
    with pytest.raises(ValueError, match=r"`p_exe` must be a finite float in \[0, 1\], got 2"):
        opm_keep_masks(q, 2, 2, rng)
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1, got 0"):
        opm_keep_masks(q, 0, 0.5, rng)
    with pytest.raises(ValueError, match="`world_size` must be an int >= 1, got 0"):
        opm_keep_masks(q, 2, 0.5, rng, world_size=0)
    with pytest.raises(ValueError, match=r"`rank` must be an int in \[0, 2\), got 2"):
        opm_keep_masks(q, 2, 0.5, rng, world_size=2, rank=2)
    with pytest.raises(ValueError, match=r"Drop probabilities must lie in \[0, 1\], got \{'a': -0.5\}"):
        opm_keep_masks({"a": -0.5, "v": 0.0}, 2, 0.5, rng)
    f = {"a": torch.ones(2, 3), "v": torch.ones(2, 3)}
    keep = {"a": torch.ones(2, dtype=torch.bool), "v": torch.ones(2, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"keys of `keep` \['a'\] differ from those of `features` \['a', 'v'\]"):
        opm_drop_features(f, {"a": keep["a"]}, 0.1)
    with pytest.raises(ValueError, match=r"keep mask of 'v' has shape \(3,\); it must be \(B,\) with B = 2"):
        opm_drop_features(f, {**keep, "v": torch.ones(3, dtype=torch.bool)}, 0.1)
    with pytest.raises(ValueError, match=r"`theta` must be a finite float in \[0, 1\), got 1.0"):
        opm_drop_features(f, keep, 1.0)


def test_drop_features_keeps_dtype_device_and_graph():
    f = torch.ones(2, 3, 4, dtype=torch.bfloat16, requires_grad=True)
    out = opm_drop_features({"a": f}, {"a": torch.tensor([True, False])}, 0.5)["a"]
    assert out.dtype == torch.bfloat16 and out.shape == f.shape
    assert out[0].eq(2).all() and out[1].eq(0).all()
    out.sum().backward()
    assert f.grad is not None and f.grad[1].eq(0).all() and f.grad[0].eq(2).all()


# --------------------------------------------------------------------------------------------- P7: the callback
class P3Module(pl.LightningModule):
    """Bias-free identity Linear encoders on P3's features and a ConcatFusion head with P3's W and b; float64."""

    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({m: nn.Linear(2, 2, bias=False) for m in ("audio", "visual")})
        self.fusion = ConcatFusion({"audio": 2, "visual": 2}, 3)
        self.double()
        with torch.no_grad():
            for enc in self.encoders.values():
                enc.weight.copy_(torch.eye(2))
            self.fusion.fc.weight.copy_(t(W))
            self.fusion.fc.bias.copy_(t(B))
        self.losses: list[float] = []
        self.grads: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}

    def forward(self, batch):
        inputs, y = batch
        self.inputs = {m: x.clone().requires_grad_() for m, x in inputs.items()}
        feats = {m: enc(self.inputs[m]) for m, enc in self.encoders.items()}
        out = self.fusion(feats)
        return MultimodalOutput(out.logits, out.unimodal_logits, y, feats)

    def training_step(self, batch, batch_idx):
        loss = multimodal_loss(self, self(batch))
        self.losses.append(float(loss))
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.grads = {n: p.grad.clone() for n, p in self.named_parameters()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _p3_batch():
    return {"audio": t(PHI_A), "visual": t(PHI_V)}, torch.tensor(Y)


def test_p7_callback_step_gives_p3(monkeypatch):
    drawn = []

    def p3_masks(q, batch_size, generator, world_size, rank):
        drawn.append((dict(q), batch_size, world_size, rank))
        return {"audio": torch.tensor(KEEP_A), "visual": torch.ones(4, dtype=torch.bool)}

    monkeypatch.setattr(opm_module, "_opm_gate", lambda generator, p_exe: True)
    monkeypatch.setattr(opm_module, "_opm_masks", p3_masks)
    model = P3Module()
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[OPM(modulation_starts=0)], max_steps=1))
    trainer.fit(model, train_dataloaders=DataLoader([_p3_batch()], batch_size=None))
    assert drawn == [({"audio": pytest.approx(0.7095040771462389, abs=1e-10), "visual": 0.0}, 4, 1, 0)]
    assert model.losses == [pytest.approx(P3_LOSS, abs=1e-12)]
    # the encoders are identity maps: their weight gradient is phi^T dL/dfeatures, the head's are P3's
    for m, expected in (("audio", P3_GRAD_A), ("visual", P3_GRAD_V)):
        torch.testing.assert_close(
            model.grads[f"encoders.{m}.weight"], t(expected).T @ t(PHI_A if m == "audio" else PHI_V), rtol=0, atol=1e-12
        )
    torch.testing.assert_close(model.grads["fusion.fc.weight"], t(P3_GRAD_W), rtol=0, atol=1e-12)
    torch.testing.assert_close(model.grads["fusion.fc.bias"], t(P3_GRAD_B), rtol=0, atol=1e-12)
    metrics = trainer.callback_metrics
    assert float(metrics["mmbalance/opm/dropped/audio"]) == 0.5
    assert float(metrics["mmbalance/opm/feature_scale"]) == pytest.approx(1.5497918006414653, rel=1e-6)
    assert float(metrics["mmbalance/opm/score/audio"]) == pytest.approx(2.5933716314054136 / 4, rel=1e-6)


class CountForwards(TinyModel):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.forwards = 0
        self.val_checked = 0

    def forward(self, batch):
        self.forwards += 1
        return super().forward(batch)

    def validation_step(self, batch, batch_idx):
        inputs, _ = batch
        out = self(batch)
        # the encoders' layers called one by one bypass the encoder hooks: the undropped prediction
        feats = [enc[2](enc[1](enc[0](inputs[m].to(self.dtype)))) for m, enc in self.encoders.items()]
        assert torch.equal(out.logits, self.head(torch.cat(feats, 1)))
        self.val_checked += 1


def test_p7_outside_window_nothing_happens_and_evaluation_never_drops():
    model = CountForwards()
    _, plain = fit([], max_epochs=1)
    fit([OPM(modulation_starts=1)], model=model, max_epochs=1)
    assert model.forwards == 8  # 64 samples / 8: no pre-pass
    assert_states_close(model.state_dict(), plain.state_dict(), atol=0)
    model = CountForwards()
    trainer, _ = fit(
        [OPM(modulation_starts=0, p_exe=1.0)], model=model, max_epochs=1, val_check_interval=2, limit_val_batches=1.0
    )
    assert model.val_checked > 4 and float(trainer.callback_metrics["mmbalance/opm/executed"]) == 1.0
    assert model.forwards == 2 * 8 + model.val_checked


class NoisyNormModel(TinyModel):
    """Encoders with BatchNorm and Dropout (float64)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        torch.manual_seed(1)
        self.encoders = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(d, 5), nn.BatchNorm1d(5), nn.Dropout(0.3), nn.Linear(5, 5))
                for m, d in (("a", 4), ("b", 6))
            }
        ).double()


class RngState(Callback):
    def on_train_end(self, trainer, pl_module):
        self.state = torch.get_rng_state()


def test_p7_pre_pass_hygiene():
    """A pre-pass changes no norm statistics, no random stream, and scores what the training forward sees."""
    inside, outside = RngState(), RngState()
    # p_exe = 0: the pre-pass runs in the window, but nothing is dropped, so training equals a run outside it
    trainer_in, model_in = fit([OPM(modulation_starts=0, p_exe=0.0), inside], model=NoisyNormModel(), max_steps=3)
    trainer_out, model_out = fit([OPM(modulation_starts=9, p_exe=0.0), outside], model=NoisyNormModel(), max_steps=3)
    assert_states_close(model_in.state_dict(), model_out.state_dict(), atol=0)  # BatchNorm running stats included
    assert torch.equal(inside.state, outside.state)
    for m in ("a", "b"):  # the pre-pass's clean scores (in) equal the training forward's recorded ones (out)
        tag = f"mmbalance/opm/score/{m}"
        assert float(trainer_in.callback_metrics[tag]) == float(trainer_out.callback_metrics[tag])


class StepMetrics(Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, *args):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("mmbalance/opm")})


def test_p7_lagged_mode_uses_the_previous_steps_scores():
    spy = StepMetrics()
    fit([OPM(modulation_starts=0, lagged=True), spy], max_steps=4)
    assert spy.steps[0]["mmbalance/opm/drop_probability/a"] == 0.0  # no scores before the first step
    for before, after in zip(spy.steps, spy.steps[1:], strict=False):
        scores = {m: before[f"mmbalance/opm/score/{m}"] for m in ("a", "b")}
        expected = opm_drop_probabilities(scores)
        for m in ("a", "b"):
            assert after[f"mmbalance/opm/drop_probability/{m}"] == pytest.approx(expected[m], rel=1e-5)
    assert any(s["mmbalance/opm/drop_probability/a"] > 0 for s in spy.steps)


def _manual_opm_training(steps: int, micro: int, batch: int, p_exe: float, seed: int) -> TinyModel:
    """The functional core per micro-batch, by hand: clean scores, q, theta, draws of (seed, step, j), drop, SGD."""
    model = TinyModel()
    data = TinyData(batch_size=batch)
    loader = iter(DataLoader(data.train_set, batch_size=batch, shuffle=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=model.lr)
    for step in range(steps):
        optimizer.zero_grad()
        for j in range(micro):
            inputs, y = next(loader)
            with torch.no_grad():
                clean = model((inputs, y))
            q = opm_drop_probabilities(ogm_scores(clean.unimodal_logits, y))
            theta = opm_theta(q, {m: f.shape[1] for m, f in clean.features.items()})
            executed, keep = opm_keep_masks(q, batch, p_exe, opm_generator(seed, step, j))
            feats = {m: enc(inputs[m].double()) for m, enc in model.encoders.items()}
            if executed and theta > 0:
                feats = opm_drop_features(feats, keep, theta)
            loss = nn.functional.cross_entropy(model.head(torch.cat(list(feats.values()), 1)), y)
            (loss / micro).backward()
        optimizer.step()
    return model


def test_p7_accumulation_equals_the_functional_core_per_micro_batch():
    manual = _manual_opm_training(steps=4, micro=2, batch=4, p_exe=0.7, seed=3)
    _, model = fit(
        [OPM(modulation_starts=0, seed=3)], data=TinyData(batch_size=4), accumulate_grad_batches=2, max_steps=4
    )
    assert_states_close(model.state_dict(), manual.state_dict(), atol=1e-12)
    _, plain = fit([], data=TinyData(batch_size=4), accumulate_grad_batches=2, max_steps=4)
    assert not torch.allclose(model.encoders["a"][0].weight, plain.encoders["a"][0].weight)


@pytest.mark.ddp
def test_p7_ddp_fully_dropped_dominant_modality(tmp_path):
    """q = 1 drops every sample of the dominant modality: its encoder gets zero gradients, no unused-parameter error."""
    cb = OPM(q_base=1.0, lam=0.0, p_exe=1.0, modulation_starts=0)
    fit([cb, SaveParams(tmp_path)], data=TinyData(batch_size=4), strategy="ddp_fork", devices=2, max_steps=3)
    rank0, rank1 = load_ranks(tmp_path)
    assert_states_close(rank0, rank1, atol=0)
    _, single = fit(
        [OPM(q_base=1.0, lam=0.0, p_exe=1.0, modulation_starts=0)], data=TinyData(batch_size=8), max_steps=3
    )
    assert_states_close(rank0, single.state_dict(), atol=1e-10)


# --------------------------------------------------------------------------------------------------- errors
class FoldedFrames(TinyModel):
    """An encoder that returns two rows per sample (frames folded into the batch)."""

    def forward(self, batch):
        inputs, y = batch
        frames = self.encoders["a"](inputs["a"].double().repeat(2, 1))
        feats = {"a": frames.view(2, -1, frames.shape[1]).mean(0), "b": self.encoders["b"](inputs["b"].double())}
        logits = self.head(torch.cat(list(feats.values()), 1))
        uni = {m: f @ self.head.weight[:, 5 * i : 5 * i + 5].T for i, (m, f) in enumerate(feats.items())}
        return MultimodalOutput(logits, uni, y, feats)


class TupleEncoder(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        return self.encoder(x), None


class TupleOutputs(TinyModel):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.encoders = nn.ModuleDict({m: TupleEncoder(enc) for m, enc in self.encoders.items()})

    def forward(self, batch):
        inputs, y = batch
        feats = {m: enc(inputs[m].double())[0] for m, enc in self.encoders.items()}
        logits = self.head(torch.cat(list(feats.values()), 1))
        uni = {m: f @ self.head.weight[:, 5 * i : 5 * i + 5].T for i, (m, f) in enumerate(feats.items())}
        return MultimodalOutput(logits, uni, y, feats)


class ArgmaxEncoder(nn.Sequential):
    def forward(self, x):
        return super().forward(x).argmax(1)


class IntegerOutput(TinyModel):
    """Encoder "a" returns class indices, an integer tensor: nothing to scale."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.encoders["a"] = ArgmaxEncoder(*self.encoders["a"])

    def forward(self, batch):
        inputs, y = batch
        feats = {"a": nn.functional.one_hot(self.encoders["a"](inputs["a"].double()), 5).double()}
        feats["b"] = self.encoders["b"](inputs["b"].double())
        logits = self.head(torch.cat(list(feats.values()), 1))
        uni = {m: f @ self.head.weight[:, 5 * i : 5 * i + 5].T for i, (m, f) in enumerate(feats.items())}
        return MultimodalOutput(logits, uni, y, feats)


class BypassesHooks(TinyModel):
    def forward(self, batch):
        inputs, y = batch
        feats = {m: enc.forward(inputs[m].double()) for m, enc in self.encoders.items()}
        logits = self.head(torch.cat(list(feats.values()), 1))
        uni = {m: f @ self.head.weight[:, 5 * i : 5 * i + 5].T for i, (m, f) in enumerate(feats.items())}
        return MultimodalOutput(logits, uni, y, feats)


ALWAYS = {"modulation_starts": 0, "p_exe": 1.0}


def test_structured_encoder_outputs_are_dropped():
    spy = StepMetrics()
    fit([OPM(**ALWAYS), spy], model=TupleOutputs(), max_steps=2)
    assert sum(step[f"mmbalance/opm/dropped/{m}"] for step in spy.steps for m in ("a", "b")) > 0


def test_error_encoder_output_not_per_sample():
    with pytest.raises(
        ValueError,
        match=r"'a' encoder's output has shape \(16, 5\), whose dimension 0 is not the batch size 8.*`encoders=`",
    ):
        fit([OPM(**ALWAYS)], model=FoldedFrames(), max_steps=1)


def test_error_bypassed_hooks():
    with pytest.raises(RuntimeError, match=r"encoders of \['a', 'b'\] did not run through their `__call__`"):
        fit([OPM(**ALWAYS)], model=BypassesHooks(), max_steps=1)


def test_error_output_without_floating_tensor():
    with pytest.raises(
        MaskingError, match=r"OPM cannot drop modality 'a': its encoder \(ArgmaxEncoder\) returns a Tensor"
    ):
        fit([OPM(**ALWAYS)], model=IntegerOutput(), max_steps=1)


def test_error_feature_dims_keys():
    with pytest.raises(ValueError, match=r"keys of `feature_dims` \['a', 'x'\] differ from the encoders' modalities"):
        fit([OPM(feature_dims={"a": 5, "x": 5})], max_steps=1)


def test_feature_dims_weigh_theta_and_hooks_are_removed():
    model = TinyModel()
    spy = StepMetrics()
    cb = OPM(feature_dims={"a": 1, "b": 3}, **ALWAYS)
    fit([cb, spy], model=model, max_steps=1)
    q_a, q_b = (spy.steps[0][f"mmbalance/opm/drop_probability/{m}"] for m in ("a", "b"))
    assert max(q_a, q_b) > 0
    assert spy.steps[0]["mmbalance/opm/feature_scale"] == pytest.approx(1 / (1 - (q_a + 3 * q_b) / 4), rel=1e-6)
    assert all(not enc._forward_hooks for enc in model.encoders.values())
    assert "q_base" in cb.state_key and OPM(q_base=0.4).state_key != OPM().state_key


def test_module_compiled_in_an_earlier_fit_still_drops():
    """Dynamo reuses code traced for another instance of the class and does not guard on hooks: OPM resets it."""
    first = TinyModel()
    first.compile(backend="aot_eager")
    fit([], model=first, max_steps=1)
    model, spy = TinyModel(), StepMetrics()
    model.compile(backend="aot_eager")
    fit([OPM(**ALWAYS), spy], model=model, max_steps=2)
    assert sum(step[f"mmbalance/opm/dropped/{m}"] for step in spy.steps for m in ("a", "b")) > 0


def test_p6_default_window_is_the_official_warm_up():
    default, short = OPM(), OPM(modulation_starts=0, modulation_ends=2)
    assert [in_window(e, default.modulation_starts, default.modulation_ends) for e in (0, 5, 6, 99)] == [
        False,
        False,
        True,
        True,
    ]
    assert [in_window(e, short.modulation_starts, short.modulation_ends) for e in (0, 2, 3)] == [True, True, False]
