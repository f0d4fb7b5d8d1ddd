"""AGM: the functional core against the specification's golden values, and the callback on tiny models."""

from __future__ import annotations

import contextlib
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mmbalance import (
    AGM,
    ConcatFusion,
    MultimodalOutput,
    multimodal_loss,
)
from lightning_mmbalance.functional import (
    agm_coefficients,
    agm_masked_coalitions,
    agm_mono_responses,
    agm_ratios,
    agm_scores,
    agm_update_running,
)
from tests.helpers.harness import GradSpy
from tests.helpers.tiny import (
    SaveParams,
    TinyData,
    TinyModel,
    assert_states_close,
    fit,
    load_ranks,
    params_of,
    trainer_kwargs,
)

T = torch.tensor
REL, ABS = 1e-10, 1e-13


def close(actual, expected, rel=REL, abs_=ABS):
    """Values (floats, tensors or mappings of them) equal within the specification's tolerance."""
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
        for k in expected:
            close(actual[k], expected[k], rel, abs_)
        return
    actual = torch.as_tensor(actual, dtype=torch.float64)
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64), rtol=rel, atol=abs_)


def coalitions(**logits):
    """Keyword names spell the modalities kept: ``av=...`` is ``F({a, v})``."""
    return {frozenset(name): T(value, dtype=torch.float64) for name, value in logits.items()}


A1 = coalitions(
    av=[[1.2, -0.3, 0.5], [0.1, 0.9, -0.4], [-0.6, 0.2, 1.1]],
    a=[[0.9, -0.1, 0.2], [0.3, 0.2, -0.1], [-0.2, 0.0, 0.4]],
    v=[[0.4, 0.1, 0.3], [-0.2, 0.8, -0.3], [-0.5, 0.3, 0.9]],
)
A3 = coalitions(
    avt=[[0.8, -0.2], [-0.1, 0.6]],
    av=[[0.5, -0.1], [0.0, 0.3]],
    at=[[0.6, 0.0], [-0.2, 0.5]],
    vt=[[0.3, -0.3], [0.1, 0.4]],
    a=[[0.4, 0.1], [-0.1, 0.2]],
    v=[[0.1, -0.2], [0.2, 0.1]],
    t=[[0.2, 0.0], [0.0, 0.3]],
)


# ---------------------------------------------------------------------------------------------- A: responses, scores
def test_a1_two_modality_responses_and_scores():
    responses = agm_mono_responses(A1, ["a", "v"])
    close(responses["a"], [[0.85, -0.25, 0.2], [0.3, 0.15, -0.1], [-0.15, -0.05, 0.3]])
    close(responses["v"], [[0.35, -0.05, 0.3], [-0.2, 0.75, -0.3], [-0.45, 0.25, 0.8]])
    close(responses["a"] + responses["v"], A1[frozenset("av")])
    scores = agm_scores(responses, T([0, 1, 2]))
    close(scores, {"a": 0.8492019052045, "v": 0.7127240541801})
    assert all(s.dtype == torch.float64 and s.ndim == 0 for s in scores.values())
    close(agm_ratios(scores), {"a": 0.8724256433799, "v": 1.146229489686})


def test_a1_balance_benchmark_response_is_not_ours():
    """BalanceBenchmark drops the w_0 F({m}) term: m_a = (F(av) - F(v)) / 2, which differs from the official one."""
    truncated = (A1[frozenset("av")] - A1[frozenset("v")]) / 2
    close(truncated, [[0.4, -0.2, 0.1], [0.15, 0.05, -0.05], [-0.05, -0.05, 0.1]])
    assert not torch.allclose(agm_mono_responses(A1, ["a", "v"])["a"], truncated)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a2_the_probability_floor(dtype):
    z = T([[30.0, 0.0, -10.0], [2.0, 1.0, 0.0]], dtype=dtype)
    scores = agm_scores({"a": z, "v": torch.zeros_like(z)}, T([2, 0]))
    close(scores["a"], 9.414143354198, rel=1e-10 if dtype == torch.float64 else 1e-6)
    assert 0.5 * (-math.log(1e-8) + 0.4076059644444) == pytest.approx(9.414143354198, rel=1e-12)


def test_a3_three_modality_responses_and_scores():
    responses = agm_mono_responses(A3, ["a", "v", "t"])
    close(responses["a"], [[13 / 30, 1 / 12], [-1 / 6, 0.2]])
    close(responses["v"], [[2 / 15, -13 / 60], [2 / 15, 0.1]])
    close(responses["t"], [[7 / 30, -1 / 15], [-1 / 15, 0.3]])
    close(sum(responses.values()), A3[frozenset("avt")])
    scores = agm_scores(responses, T([0, 1]))
    close(scores, {"a": 0.5299541256225, "v": 0.6216674425524, "t": 0.5404406701474})
    close(agm_ratios(scores), {"a": 1.05242805793, "v": 0.9171630222966, "t": 1.036003077031})


def test_masked_coalitions_order():
    assert agm_masked_coalitions(["a", "v"]) == [frozenset("a"), frozenset("v")]
    three = agm_masked_coalitions(["a", "v", "t"])
    assert three == [frozenset(s) for s in ("a", "v", "t", "av", "at", "vt")]
    assert len(agm_masked_coalitions(list("abcd"))) == 2**4 - 2


# ---------------------------------------------------------------------------------------------- B: coefficients
B1 = [  # t, s, r, target r, k, running scores after
    ((0.9, 1.4), (1.6487212707, 0.6065306597126), (1, 1), (0.3779165382395, 1.804356485396), (0.9, 1.4)),
    (
        (0.8, 1.5),
        (2.01375270747, 0.4965853037914),
        (1.6487212707, 0.6065306597126),
        (0.5783667157625, 1.179296452397),
        (0.85, 1.45),
    ),
    (
        (1.0, 1.2),
        (1.22140275816, 0.818730753078),
        (1.822118800391, 0.548811636094),
        (2.462246299925, 0.6670577364116),
        (0.9, 1.366666666667),
    ),
]


def pair(values):
    return dict(zip(("a", "v"), values, strict=True))


def test_b1_running_scores_and_coefficients_over_three_steps():
    running = pair((0.0, 0.0))
    for t, (s, r, target, k, after) in enumerate(B1, start=1):
        close(agm_ratios(pair(s)), pair(r))
        close(agm_ratios(running), pair(target))
        close(agm_coefficients(pair(s), running, alpha=1.5, cap=10.0), pair(k))
        running = agm_update_running(running, pair(s), step=t)
        close(running, pair(after))


@pytest.mark.parametrize(("cap", "expected_a"), [(10.0, 3269017.372472), (7.0, 36315.50267425), (None, 131643366.1388)])
def test_b2_the_cap(cap, expected_a):
    k = agm_coefficients(pair((1.0, 1.0)), pair((0.2, 2.8)), alpha=1.5, cap=cap)
    close(k["a"], expected_a)
    close(k["v"], 0.2494268401407)
    close(agm_ratios(pair((0.2, 2.8))), pair((13.463738035, 0.07427357821433)))


def test_b2_the_extremes():
    close(agm_ratios(pair((0.2, 3.0))), pair((16.4446467711, 0.06081006262522)))
    close(agm_coefficients(pair((0.2, 3.0)), pair((1.0, 1.0)), alpha=1.5), pair((8.683857707511e-11, 4.090981456009)))
    assert agm_coefficients(pair((0.7, 1.3)), pair((0.7, 1.3)), alpha=1.5) == pair((1.0, 1.0))
    assert agm_coefficients(pair((0.2, 3.0)), pair((1.0, 1.0)), alpha=0.0) == pair((1.0, 1.0))


def test_an_overflowing_coefficient_is_inf_without_a_cap():
    k = agm_coefficients(pair((1.0, 1.0)), pair((0.0, 18.0)), alpha=100.0, cap=None)
    assert k["a"] == math.inf and 0 < k["v"] < 1


def test_b3_three_modalities_and_the_two_modality_reduction():
    s, running = {"a": 0.6, "v": 0.9, "t": 0.75}, {"a": 0.7, "v": 0.8, "t": 0.6}
    close(agm_ratios(s), {"a": 1.252322716192, "v": 0.7985162187594, "t": 1.0})
    close(agm_ratios(running), {"a": 1.0, "v": 0.8607079764251, "t": 1.161834242728})
    close(
        agm_coefficients(s, running, alpha=4.0, cap=7.0),
        {"a": 0.3644773516819, "v": 1.282443228316, "t": 1.910446474287},
    )
    close(agm_update_running(running, s, step=3), {"a": 2 / 3, "v": 5 / 6, "t": 0.65})
    k = agm_coefficients(pair((0.6, 0.9)), pair((0.7, 0.8)), alpha=1.5, cap=10.0)
    close(k, pair((0.6927875903196, 1.278936401304)))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: agm_masked_coalitions(["a"]), r"at least 2 distinct modalities, got \['a'\]"),
        (lambda: agm_masked_coalitions(["a", "a"]), r"at least 2 distinct modalities, got \['a', 'a'\]"),
        (lambda: agm_mono_responses({frozenset("av"): A1[frozenset("av")]}, ["a", "v"]), r"lacks the coalitions"),
        (
            lambda: agm_mono_responses({**A1, frozenset("a"): torch.zeros(2, 3)}, ["a", "v"]),
            r"one common B and C",
        ),
        (
            lambda: agm_scores({"a": torch.zeros(2, 3)}, T([0, 1]), min_prob=1.0),
            r"`min_prob` must be a float in \(0, 1\)",
        ),
        (lambda: agm_scores({"a": torch.zeros(2, 3), "v": torch.zeros(3, 3)}, T([0, 1])), "one common B and C"),
        (lambda: agm_scores({"a": torch.zeros(2, 3)}, T([0.0, 1.0])), "1-D integer tensor of length 2"),
        (lambda: agm_scores({"a": torch.zeros(2, 3)}, T([0, 3])), r"must lie in \[0, 3\), got \[0, 3\]"),
        (lambda: agm_ratios({"a": 1.0}), "at least 2 distinct modalities"),
        (lambda: agm_ratios({"a": 1.0, "v": math.nan}), "AGM scores must be finite"),
        (lambda: agm_coefficients(pair((1, 1)), pair((0, 0)), alpha=-1.0), "`alpha` must be a finite float >= 0"),
        (lambda: agm_coefficients(pair((1, 1)), pair((0, 0)), alpha=1.0, cap=0.0), "`cap` must be a float > 0 or None"),
        (lambda: agm_coefficients(pair((1, 1)), {"a": 0.0}, alpha=1.0), "`running_scores` must have the modalities"),
        (lambda: agm_update_running(pair((1, 1)), pair((1, 1)), step=0), "`step` must be an int >= 1, got 0"),
        (lambda: agm_update_running(pair((1, 1)), {"v": 1.0}, step=1), "`scores` must have the modalities"),
    ],
)
def test_functional_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------ C: the callback's gradients
class Tiny(pl.LightningModule):
    """The specification's C models: ``tanh(x A^T)`` encoders (optionally with BatchNorm), a ConcatFusion head."""

    def __init__(self, encoders: dict[str, list], weight: list, bias: list, batchnorm: bool = False) -> None:
        super().__init__()
        layers = {}
        for m, a in encoders.items():
            linear = nn.Linear(2, 2, bias=False)
            linear.weight.data = T(a)
            layers[m] = nn.Sequential(linear, *([nn.BatchNorm1d(2)] if batchnorm else []), nn.Tanh())
        self.encoders = nn.ModuleDict(layers)
        self.fusion = ConcatFusion(dict.fromkeys(encoders, 2), len(weight))
        self.fusion.fc.weight.data, self.fusion.fc.bias.data = T(weight), T(bias)
        self.double()  # the parameters are the float32 roundings of the values, as in the specification's model

    def forward(self, batch):
        *inputs, y = batch
        fused = self.fusion({m: enc(x) for (m, enc), x in zip(self.encoders.items(), inputs, strict=True)})
        return MultimodalOutput(fused.logits, fused.unimodal_logits, y)

    def training_step(self, batch, batch_idx):
        return multimodal_loss(self, self(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


X = {
    "a": [[1, -0.5], [0.3, 0.8], [-1.2, 0.4], [0.6, 0.6]],
    "v": [[0.2, 1], [-0.7, 0.1], [0.5, -0.3], [0, 0.9]],
    "t": [[0.4, -0.2], [1.1, 0.3], [-0.3, -0.8], [0.2, 0.5]],
}
A = {"a": [[0.8, -0.4], [0.3, 0.9]], "v": [[0.5, 0.2], [-0.6, 0.7]], "t": [[0.6, 0.1], [-0.2, 0.4]]}
C1 = dict(
    weight=[[0.7, -0.2, 0.3, 0.1], [-0.4, 0.6, -0.1, 0.5], [0.2, 0.3, 0.6, -0.4]],
    bias=[0.1, -0.1, 0.05],
    y=[0, 1, 2, 1],
    running={"a": 0.9, "v": 1.1},
    alpha=1.5,
    cap=10.0,
)
C2 = dict(
    weight=[[0.5, -0.3, 0.2, 0.4, -0.1, 0.3], [-0.2, 0.4, -0.5, 0.1, 0.6, -0.3]],
    bias=[0.05, -0.05],
    y=[0, 1, 1, 0],
    running={"a": 0.7, "v": 0.8, "t": 0.6},
    alpha=4.0,
    cap=7.0,
)


def one_step(spec, batchnorm=False, extra=(), plugins=(), **kwargs):
    """One step of the C model under AGM; returns the callback, the gradients before and after it, the metrics."""
    modalities = list(spec["running"])
    model = Tiny({m: A[m] for m in modalities}, spec["weight"], spec["bias"], batchnorm)
    agm = AGM(alpha=spec["alpha"], cap=spec["cap"], **{"head_grad_clip": None, **kwargs})
    agm.load_state_dict({"version": 1, "running_scores": spec["running"], "steps": 4})
    before, after = GradSpy(), GradSpy()
    data = TensorDataset(*(T(X[m], dtype=torch.float64) for m in modalities), T(spec["y"]))
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[before, agm, after, *extra], max_steps=1, plugins=list(plugins)))
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=4))
    return agm, before.steps[0], after.steps[0], trainer.callback_metrics


C1_MODULATED = {
    "encoders.a.0.weight": [[0.1142139127549, 0.2464098052124], [0.04219417457365, -0.139533880282]],
    "encoders.v.0.weight": [[-0.05892223369365, 0.07642687408357], [0.0618099886773, -0.07666306219538]],
    "fusion.fc.weight": [
        [-0.1703186945656, 0.1536778192623, -0.02092377586309, -0.01048340778052],
        [-0.08654554618825, -0.262685027292, 0.03078738184743, -0.1170070035718],
        [0.2568642407538, 0.1090072080297, -0.009863605984334, 0.1274904113524],
    ],
    "fusion.fc.bias": [0.08972947501521, -0.1557086979795, 0.06597922296432],
}


@pytest.mark.parametrize("masked_graph", ["head", "full", "none"])
def test_c1_gradients_two_modalities(masked_graph):
    agm, plain, modulated, metrics = one_step(C1, masked_graph=masked_graph)
    logged = {q: {m: float(metrics[f"mmbalance/agm/{q}/{m}"]) for m in "av"} for q in ("score", "ratio", "coefficient")}
    close(logged["score"], {"a": 0.94805212074, "v": 0.9310792840405}, rel=1e-6)  # logged values are float32
    close(logged["ratio"], {"a": 0.983170390425, "v": 1.017117693676}, rel=1e-6)
    k = {"a": 1.429534049412, "v": 0.7426128666527}
    close(logged["coefficient"], k, rel=1e-6)
    close(plain["encoders.a.0.weight"], [[0.07989590230597, 0.1723707142993], [0.02951603327742, -0.09760794458824]])
    close(plain["fusion.fc.bias"], [0.08261823760777, -0.1433684773603, 0.06075023975251])
    expected = dict(C1_MODULATED)
    if masked_graph == "none":
        expected["fusion.fc.weight"] = plain["fusion.fc.weight"] * (k["a"] + k["v"]) / 2
    close(modulated, expected)
    assert agm.steps == 5
    close(
        agm.running_scores,
        {m: (4 * C1["running"][m] + s) / 5 for m, s in (("a", 0.94805212074), ("v", 0.9310792840405))},
    )


class ScaledLossOnly(MixedPrecision):
    """16-mixed's GradScaler without autocast: the loss scale is the only difference from 32-true."""

    def forward_context(self):
        return contextlib.nullcontext()


@pytest.mark.parametrize("masked_graph", ["head", "full"])
def test_the_loss_scale_is_undone_in_the_masked_pass_gradients(masked_graph):
    """The head gradient of the masked passes comes from the backward at the GradScaler's scale: undone exactly."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _, _, modulated, _ = one_step(C1, masked_graph=masked_graph, plugins=[ScaledLossOnly("16-mixed", "cpu", scaler)])
    close(modulated, C1_MODULATED)


@pytest.mark.parametrize("masked_graph", ["head", "full"])
def test_c2_gradients_three_modalities(masked_graph):
    _, _, modulated, metrics = one_step(C2, masked_graph=masked_graph)
    k = {m: float(metrics[f"mmbalance/agm/coefficient/{m}"]) for m in "avt"}
    close(k, {"a": 0.6552063605019, "v": 0.5674301629746, "t": 2.824319126311}, rel=1e-6)
    close(
        modulated,
        {
            "encoders.a.0.weight": [[-0.05461385176954, 0.007285984388378], [0.1022088533723, -0.02812966993989]],
            "encoders.v.0.weight": [[-0.003704794101131, -0.07701652764235], [-0.001800059902492, -0.02472491109623]],
            "encoders.t.0.weight": [[0.06131435812017, 0.2039703062126], [-0.009883434021688, -0.1626284192973]],
            "fusion.fc.weight": [
                [
                    -0.1106872009071,
                    -0.01092428871147,
                    -0.02621797149722,
                    -0.06824381227805,
                    -0.05766275615928,
                    -0.1086371840868,
                ],
                [
                    0.1106872009071,
                    0.01092428871147,
                    0.02621797149722,
                    0.06824381227805,
                    0.05766275615928,
                    0.1086371840868,
                ],
            ],
            "fusion.fc.bias": [-0.03814579360534, 0.03814579360534],
        },
    )


# ---------------------------------------------------------------------------------------------- D: package invariants
class Probe(Callback):
    """In ``on_before_backward``: the modules' training flags, their buffers, the RNG state; encoder calls counted."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []
        self.calls = 0

    def on_train_start(self, trainer, pl_module):
        for encoder in pl_module.encoders.values():
            encoder.register_forward_hook(self._count)

    def _count(self, *args):
        self.calls += 1

    def on_before_backward(self, trainer, pl_module, loss):
        flags = [m.training for m in pl_module.modules()]
        buffers = [b.clone() for b in pl_module.buffers()]
        self.seen.append((flags, buffers, torch.get_rng_state(), self.calls))


class DropoutBN(TinyModel):
    """TinyModel with BatchNorm and dropout in the encoders, and one frozen (eval-mode) BatchNorm."""

    def __init__(self, **kw):
        super().__init__(**kw)
        for m, enc in self.encoders.items():
            self.encoders[m] = nn.Sequential(enc[0], nn.BatchNorm1d(5), nn.Dropout(0.3), *enc[1:]).double()
        self.encoders["a"][1].eval()
        self.encoders["a"][1].train = lambda mode=True: self.encoders["a"][1]  # a user-frozen BatchNorm


@pytest.mark.parametrize("dims", [{"a": 4, "b": 6}, {"a": 4, "b": 6, "c": 3}])
def test_masked_forwards_leave_no_trace_and_count(dims):
    """2^N - 2 masked forwards per micro-batch, which change no training flag, BatchNorm statistic or RNG state."""
    first, second = Probe(), Probe()
    _, model = fit([first, AGM(), second], model=DropoutBN(dims=dims), data=TinyData(dims=dims), max_steps=3)
    n = len(dims)
    assert len(first.seen) == len(second.seen) == 3
    for (flags, buffers, rng, before), (flags2, buffers2, rng2, after) in zip(first.seen, second.seen, strict=True):
        assert flags == flags2 and torch.equal(rng, rng2)
        assert all(torch.equal(x, y) for x, y in zip(buffers, buffers2, strict=True))
        assert after - before == n * (2**n - 2)
    assert not model.encoders["a"][1].training and model.encoders["b"][1].training


def test_outside_the_window_gradients_are_untouched_but_running_scores_move():
    before, after = GradSpy(), GradSpy()
    agm = AGM(modulation_starts=1, head_grad_clip=None)
    trainer, _ = fit([before, agm, after], max_steps=3)
    for seen, result in zip(before.steps, after.steps, strict=True):
        assert all(torch.equal(seen[k], result[k]) for k in seen)
    assert agm.steps == 3 and all(v > 0 for v in agm.running_scores.values())
    assert all(float(trainer.callback_metrics[f"mmbalance/agm/coefficient/{m}"]) == 1.0 for m in "ab")


@pytest.mark.parametrize("masked_graph", ["head", "full", "none"])
def test_update_mode_equals_gradient_mode_for_plain_sgd(masked_graph):
    _, gradient_mode = fit([AGM(masked_graph=masked_graph, head_grad_clip=None)], max_epochs=2)
    _, update_mode = fit([AGM(masked_graph=masked_graph, head_grad_clip=None, modulate="update")], max_epochs=2)
    assert_states_close(params_of(gradient_mode), params_of(update_mode), atol=1e-12)


def test_conditional_clip():
    """An entry of the head's gradient above c: all gradients scaled to norm c; entries within c: untouched."""
    _, _, unclipped, _ = one_step(C1)
    largest = float(unclipped["fusion.fc.weight"].abs().max())
    _, _, clipped, metrics = one_step(C1, head_grad_clip=largest / 2)
    assert float(torch.stack([g.norm() for g in clipped.values()]).norm()) == pytest.approx(largest / 2, rel=1e-5)
    factor = clipped["fusion.fc.bias"][0] / unclipped["fusion.fc.bias"][0]
    assert factor < 1 and all(torch.allclose(clipped[k], factor * unclipped[k]) for k in unclipped)
    assert float(metrics["mmbalance/agm/clipped"]) == 1.0
    _, _, within, metrics = one_step(C1, head_grad_clip=1.01 * largest)
    assert all(torch.equal(within[k], unclipped[k]) for k in unclipped)
    assert float(metrics["mmbalance/agm/clipped"]) == 0.0


@pytest.mark.ddp
def test_ddp_without_masked_graphs_equals_one_process(tmp_path):
    make = lambda: [AGM(masked_graph="none")]  # noqa: E731
    kw = dict(model=TinyModel(momentum=0.9), data=TinyData(batch_size=4), max_epochs=2)
    fit([*make(), SaveParams(tmp_path)], strategy="ddp_fork", devices=2, **kw)
    rank0, rank1 = load_ranks(tmp_path)
    assert_states_close(rank0, rank1, atol=0)
    _, single = fit(make(), model=TinyModel(momentum=0.9), data=TinyData(batch_size=8), max_epochs=2)
    assert_states_close(rank0, single.state_dict(), atol=1e-10)


def test_an_overflowing_coefficient_raises_and_names_the_remedy():
    agm = AGM(alpha=50.0, cap=None)
    agm.load_state_dict({"version": 1, "running_scores": {"a": 0.0, "b": 18.0}, "steps": 10})
    with pytest.raises(RuntimeError, match=r"AGM: the coefficient of modality 'a' overflows at step 0.*`cap=10.0`"):
        fit([agm], max_steps=1)


def test_five_modalities_warn_about_the_forward_count():
    dims = dict.fromkeys("abcde", 2)
    with pytest.warns(UserWarning, match=r"AGM runs 2\^N - 2 = 30 masked forwards per micro-batch for 5 modalities"):
        fit([AGM()], model=TinyModel(dims=dims), data=TinyData(n=8, dims=dims), max_steps=1)


def test_a_non_finite_masked_pass_gradient_falls_back_to_no_graph(monkeypatch):
    """A float16 overflow in the head's masked-pass gradient: that step modulates as ``masked_graph='none'``."""
    masked_gradients = AGM._masked_gradients

    def overflow(self, trainer, residuals, grad):
        return masked_gradients(self, trainer, residuals, grad).fill_(math.inf)

    monkeypatch.setattr(AGM, "_masked_gradients", overflow)
    with pytest.warns(UserWarning, match=r"AGM: the masked passes' head gradient is not finite at step 0 .*'none'"):
        _, fallback = fit([AGM(head_grad_clip=None)], max_steps=2)
    _, plain = fit([AGM(masked_graph="none", head_grad_clip=None)], max_steps=2)
    assert_states_close(params_of(fallback), params_of(plain), atol=0)
