"""InfoReg: the golden values of its specification (I1-I7), the official epoch body, the window and the anchors."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_mmbalance import (
    DiagnosingRelearning,
    GradientBlending,
    InfoReg,
    MultimodalOutput,
    multimodal_loss,
)
from lightning_mmbalance.functional import (
    inforeg_coefficients,
    inforeg_gaps,
    inforeg_growth,
    inforeg_proximal_,
    inforeg_trace_term,
    inforeg_window_open,
    ogm_scores,
)
from lightning_mmbalance.utilities.distributed import is_sharded
from tests.helpers.harness import GradSpy
from tests.helpers.sharded import AssertSharded, ForkModelParallel, SaveFullParams, ShardedTinyModel
from tests.helpers.tiny import TinyModel, assert_states_close, fit, load_ranks, make_data, params_of, trainer_kwargs


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def close(actual, expected, rtol=1e-10):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), t(expected), rtol=rtol, atol=1e-12)


Z_A = [[2.0, 0.5, -1.0], [0.2, 1.5, 0.1], [-0.5, 0.3, 1.2], [1.0, -1.0, 0.0]]
Z_V = [[0.3, 0.1, -0.2], [0.0, 0.4, 0.2], [0.1, -0.1, 0.5], [0.6, 0.0, -0.3]]
Z_T = [[0.5, 0.5, 0.0], [1.0, 0.0, -1.0], [0.0, 0.2, 0.1], [0.3, 0.3, 0.3]]
Y = torch.tensor([0, 1, 2, 0])
S_A, S_V = 2.738336402205, 1.77612217815
OPEN = {"a": True, "v": True}


# ------------------------------------------------------------------------------------------------ I1, I2, I6: the rule
def test_i1_scores_gaps_and_coefficients():
    probs = {m: F.softmax(t(z), 1)[torch.arange(4), Y] for m, z in (("a", Z_A), ("v", Z_V))}
    close(probs["a"], [0.7855970345893, 0.6582720492968, 0.6292263625442, 0.6652409557748])
    close(probs["v"], [0.4123266855796, 0.4017595785334, 0.4506267059557, 0.5114092080814])
    scores = ogm_scores({"a": t(Z_A), "v": t(Z_V)}, Y)
    close([scores["a"], scores["v"]], [S_A, S_V])
    gaps = inforeg_gaps(scores)
    close([gaps["a"], gaps["v"]], [0.962214224055, 0.0])
    close(math.tanh(gaps["a"]), 0.745262899719)
    close(list(inforeg_coefficients(scores, OPEN).values()), [2.001645526111, 0.0])
    mean = {m: float(s) / 4 for m, s in scores.items()}
    close(inforeg_gaps(mean)["a"], 0.2405535560137)
    close(inforeg_coefficients(mean, OPEN)["a"], 1.20288789371)
    close(inforeg_coefficients(mean, OPEN, scale=1.0, sensitivity=0.9)["a"], 1.236663075812)
    swapped = {"a": S_V, "v": S_A}
    close(list(inforeg_coefficients(swapped, OPEN).values()), [0.0, 0.2106995290643])
    assert list(inforeg_coefficients(scores, {"a": False, "v": False}).values()) == [0.0, 0.0]
    assert list(inforeg_coefficients({"a": 2.0, "v": 2.0}, OPEN).values()) == [0.0, 0.0]


def test_i1_micro_batch_score_sums_add_up():
    halves = [ogm_scores({"a": t(Z_A)[rows], "v": t(Z_V)[rows]}, Y[rows]) for rows in (slice(0, 2), slice(2, 4))]
    summed = {m: float(halves[0][m] + halves[1][m]) for m in ("a", "v")}
    close(list(inforeg_coefficients(summed, OPEN).values()), [2.001645526111, 0.0])


def test_i1_first_release_never_regulates_the_second_modality():
    """The first release's unreachable ``elif`` is ``scale=(0.95, 0.0)``: the second modality is never regulated."""
    for scores in ({"a": S_A, "v": S_V}, {"a": S_V, "v": S_A}):
        assert inforeg_coefficients(scores, OPEN, scale=(0.95, 0.0))["v"] == 0.0


@pytest.mark.parametrize(
    ("gap", "first", "second", "paper"),
    [
        (0.0, 0.0, 0.0, 0.0),
        (0.1, 1.049563853479, 0.1104804056294, 1.093847387978),
        (0.5, 1.508059707858, 0.158743127143, 1.515742535805),
        (1.0, 2.034603300512, 0.2141687684749, 1.984634448712),
        (2.0, 2.491124676196, 0.2622236501259, 2.381248243056),
        (3.0, 2.569628817015, 0.2704872438963, 2.448680427205),
        (64.0, 2.582367737036, 0.2718281828459, 2.459603111157),
    ],
)
def test_i2_coefficient_versus_gap(gap, first, second, paper):
    official = inforeg_coefficients({"a": gap, "v": 0.0}, OPEN)["a"]
    official_second = inforeg_coefficients({"a": 0.0, "v": gap}, OPEN)["v"]
    close([official, official_second], [first, second])
    close(inforeg_coefficients({"a": gap, "v": 0.0}, OPEN, scale=1.0, sensitivity=0.9)["a"], paper)


def test_i6_three_modalities_and_reduction_to_two():
    scores = ogm_scores({"a": t(Z_A), "v": t(Z_V), "t": t(Z_T)}, Y)
    close([scores[m] for m in "avt"], [S_A, S_V, 1.293938529112])
    close(list(inforeg_gaps(scores).values()), [1.203306048574, 0.482183649038, 0.0])
    windows = {**OPEN, "t": True}
    close(list(inforeg_coefficients(scores, windows).values()), [2.188829548569, 0.1565164165684, 0.0])
    paper = inforeg_coefficients(scores, windows, scale=1.0, sensitivity=0.9)
    close(list(paper.values()), [2.119529687117, 1.496593678911, 0.0])
    assert inforeg_coefficients(scores, windows, scale={"a": 0.95, "v": 0.1, "t": 0.1}) == inforeg_coefficients(
        scores, windows
    )


# ------------------------------------------------------------------------------------------------------ I3: the window
T = [2.0, 3.5, 4.2, 4.6, 4.8, 4.9, 4.95, 4.9, 4.8, 4.7, 4.6, 4.5, 4.4, 4.3]
K_OFFICIAL = [
    1, 1, 0.6363636363636, 0.4329896907216, 0.3216783216783, 0.2513089005236, 0.2041666666667, 0.1709844559585,
    0.1447562776957, 0.124191461837, 0.1084198385236, 0.05658324265506, 0.02129925452609, 0.00424178154825,
    -0.006403415154749,
]  # fmt: skip
K_PAPER = [
    None, None, 0.4285714285714, 0.1666666666667, 0.08695652173913, 0.04166666666667, 0.02040816326531,
    0.01010101010101, -0.01020408163265, -0.02083333333333, -0.02127659574468, -0.02173913043478,
    -0.02222222222222, -0.02272727272727, -0.02325581395349,
]  # fmt: skip


def official_k(traces: list[float]) -> float:
    """main.py:237-243, transcribed: the lists start with ten zeros."""
    trace_list = [0.0] * 10 + traces
    tr1 = sum(trace_list[-10:]) / 10
    tr2 = sum(trace_list[-11:-1]) / 10
    return (tr1 - tr2) / tr1


def test_i3_official_window():
    ks = [inforeg_growth(T[:e]) for e in range(15)]
    close(ks, K_OFFICIAL)
    assert ks[1:] == [official_k(T[:e]) for e in range(1, 15)]
    for threshold in (0.05, 0.04):
        assert [inforeg_window_open(T[:e], threshold) for e in range(15)] == [e <= 11 for e in range(15)]


def test_i3_paper_window():
    ks = [inforeg_growth(T[:e], window_size=1, pad_history=False) for e in range(15)]
    assert ks[:2] == [None, None]
    close(ks[2:], K_PAPER[2:])
    for threshold, opened in ((0.05, {2, 3, 4}), (0.04, {2, 3, 4, 5})):
        windows = [inforeg_window_open(T[:e], threshold, window_size=1, pad_history=False) for e in range(15)]
        assert {e for e, w in enumerate(windows) if w} == opened


def test_i3_zero_traces_leave_the_window_closed():
    assert inforeg_growth([0.0]) is None
    assert not inforeg_window_open([0.0])
    with pytest.raises(ZeroDivisionError):
        official_k([0.0])


# ------------------------------------------------------------------------------------------- I4, I5: trace, proximal
STEPS = [
    ([[0.1, -0.2, 0.3], [0.0, 0.4, -0.1]], [[0.5, -0.5], [0.25, 0.0]]),
    ([[0.2, 0.1, 0.0], [-0.3, 0.1, 0.2]], [[0.1, 0.2], [-0.2, 0.4]]),
]


def test_i4_trace_terms():
    terms = [inforeg_trace_term([t(g1), t(g2)]) for g1, g2 in STEPS]
    close(terms, [0.1922916666667, 0.09416666666667])
    close(sum(terms), 0.2864583333333)
    close(sum(terms), 0.31 / 6 + 0.5625 / 4 + 0.19 / 6 + 0.25 / 4)
    close(sum(inforeg_trace_term([t(g1), t(g2)], "sum") for g1, g2 in STEPS), 1.3125)
    assert inforeg_trace_term([]) == 0.0
    assert inforeg_trace_term([t(STEPS[0][0]).float()]) == pytest.approx(0.31 / 6, rel=1e-6)


THETA, THETA0 = [[0.5, -0.3], [0.2, 0.1]], [[0.45, -0.25], [0.2, 0.3]]
G, BUFFER, LAMBDA = [[0.1, -0.2], [0.05, 0.0]], [[0.01, 0.02], [-0.03, 0.0]], 2.001645526111


def sgd_step(grad: torch.Tensor, buffer: list | None, pull: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD(lr 0.002, momentum 0.9, wd 1e-4) step on THETA with ``grad``, then ``theta -= lr * pull * (theta -
    theta0)`` computed before the step; returns (theta', momentum buffer)."""
    p = nn.Parameter(t(THETA))
    opt = torch.optim.SGD([p], lr=0.002, momentum=0.9, weight_decay=1e-4)
    if buffer is not None:
        opt.state[p]["momentum_buffer"] = t(buffer)
    pulled = 0.002 * pull * (t(THETA) - t(THETA0))
    p.grad = grad.clone()
    opt.step()
    with torch.no_grad():
        p -= pulled
    return p.detach(), opt.state[p]["momentum_buffer"]


def test_i5_one_proximal_update():
    grad = t(G)
    inforeg_proximal_([grad], [t(THETA)], [t(THETA0)], LAMBDA)
    close(grad, [[0.2000822763056, -0.3000822763056], [0.05, -0.4003291052222]])
    close(sgd_step(grad, None)[0], [[0.4995997354474, -0.2993997754474], [0.19989996, 0.1008006382104]])
    theta, buffer = sgd_step(grad, BUFFER)
    close(buffer, [[0.2091322763056, -0.2821122763056], [0.02302, -0.4003191052222]])
    close(theta, [[0.4995817354474, -0.2994357754474], [0.19995396, 0.1008006382104]])
    update_theta, update_buffer = sgd_step(t(G), BUFFER, pull=LAMBDA)
    close(update_theta, [[0.4995817354474, -0.2994357754474], [0.19995396, 0.1008006382104]])
    close(update_buffer, [[0.10905, -0.18203], [0.02302, 0.00001]])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: inforeg_gaps({"a": 1.0}), ValueError, r"at least 2 modalities, got \['a'\]"),
        (lambda: inforeg_gaps({"a": 1.0, "v": math.nan}), ValueError, "Scores must be finite, got {'v': nan}"),
        (lambda: inforeg_coefficients({"a": 1.0, "v": 0.0}, {"a": True}), ValueError, "`window_open` must have"),
        (lambda: inforeg_coefficients({"a": 1.0, "v": 0}, OPEN, scale=-1.0), ValueError, "`scale` must be finite"),
        (lambda: inforeg_coefficients({"a": 1.0, "v": 0}, OPEN, scale=(1, 2, 3)), ValueError, "1 to 2 values"),
        (lambda: inforeg_coefficients({"a": 1.0, "v": 0}, OPEN, scale={"a": 1}), ValueError, "exactly the modalities"),
        (
            lambda: inforeg_coefficients({"a": 1.0, "v": 0}, OPEN, sensitivity=math.inf),
            ValueError,
            "`sensitivity` must be a finite float >= 0, got inf",
        ),
        (lambda: inforeg_growth([1.0, -1.0]), ValueError, r"Traces must be finite and >= 0, got \[-1.0\]"),
        (lambda: inforeg_growth([1.0], window_size=0), ValueError, "`window_size` must be an int >= 1, got 0"),
        (lambda: inforeg_window_open([1.0], threshold=math.nan), ValueError, "`threshold` must be a finite float"),
        (lambda: inforeg_trace_term([], "mean"), ValueError, r"`reduction` must be one of \('layer_mean', 'sum'\)"),
        (lambda: inforeg_proximal_([t(G)], [], [], 1.0), ValueError, "lengths 1, 0 and 0"),
        (lambda: inforeg_proximal_([t(G)], [t(G)], [t([1.0])], 1.0), ValueError, "must have one shape"),
        (lambda: inforeg_proximal_([t(G)], [t(G)], [t(G)], -1.0), ValueError, "`coefficient` must be a finite float"),
    ],
)
def test_functional_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------- I7: the official epoch body, end to end
BATCHES = [
    ([[1, 0], [0.5, -1], [0, 2], [-1, 1]], [[0.2, 0.4], [1, 0], [-0.3, 0.8], [0.5, 0.5]], [0, 1, 2, 0]),
    ([[-0.5, 0.5], [4, -1.5], [-0.5, 1], [-2, 0.5]], [[0.5, -1], [0, -1], [0, -0.5], [-1.5, 0.5]], [1, 0, 2, 1]),
    ([[0.5, 0], [-1, -1], [-1, 1], [-1.5, -2.5]], [[1.5, 2], [1, 1], [2.5, -2], [2, 0]], [2, 2, 0, 1]),
]
PATHS = {"audio": "audio_net", "visual": "visual_net"}


class Official(pl.LightningModule):
    """The tiny model of I7: linear encoders, a fused linear head, unimodal logits from its slices and half the bias."""

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        self.audio_net = nn.Linear(2, 2)
        self.visual_net = nn.Linear(2, 2, bias=False)
        self.head = nn.Linear(4, 3)
        self.double()
        with torch.no_grad():
            self.audio_net.weight.copy_(t([[0.6, -0.4], [0.3, 0.8]]))
            self.audio_net.bias.copy_(t([0.1, -0.1]))
            self.visual_net.weight.copy_(t([[0.05, 0.1], [-0.1, 0.02]]))
            self.head.weight.copy_(t([[0.4, -0.3, 0.2, 0.1], [-0.2, 0.5, -0.1, 0.3], [0.1, 0.1, 0.3, -0.4]]))
            self.head.bias.copy_(t([0.05, -0.05, 0.0]))
        self.momentum = momentum

    def forward(self, batch):
        x_a, x_v, y = batch
        a, v = self.audio_net(x_a), self.visual_net(x_v)
        w, b = self.head.weight, self.head.bias
        unimodal = {"audio": a @ w[:, :2].T + b / 2, "visual": v @ w[:, 2:].T + b / 2}
        return MultimodalOutput(self.head(torch.cat([a, v], 1)), unimodal, y)

    def training_step(self, batch, batch_idx):
        return multimodal_loss(self, self(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=self.momentum, weight_decay=1e-4)


def batches():
    return [(t(a), t(v), torch.tensor(y)) for a, v, y in BATCHES]


def official_epoch(model: Official) -> tuple[list[list[float]], dict[str, float], list[dict[str, torch.Tensor]]]:
    """main.py's train_epoch at epoch 0 (k = 1), transcribed: per step [L, S_a, S_v, beta, beta2], the traces
    (per-layer means of summed squared weight gradients) and every step's gradients after the proximal term."""
    opt = model.configure_optimizers()
    global_model = copy.deepcopy(model)
    fisher = {"audio_net": 0.0, "visual_net": 0.0}
    rows, grads = [], []
    for x_a, x_v, y in batches():
        opt.zero_grad()
        out = model((x_a, x_v, y))
        z_a, z_v = out.unimodal_logits["audio"], out.unimodal_logits["visual"]
        loss = F.cross_entropy(out.logits, y) + F.cross_entropy(z_a, y) + F.cross_entropy(z_v, y)
        loss.backward()
        score_a = F.softmax(z_a, 1)[torch.arange(4), y].sum().item()
        score_v = F.softmax(z_v, 1)[torch.arange(4), y].sum().item()
        k = 1.0
        beta = beta2 = 0.0
        if score_a > score_v and k > 0.05:
            beta = 0.95 * math.exp(math.tanh(score_a - score_v))
        elif score_a < score_v and k > 0.05:
            beta2 = 0.1 * math.exp(math.tanh(score_v - score_a))
        with torch.no_grad():
            for name, coefficient in (("audio_net", beta), ("visual_net", beta2)):
                for p, p0 in zip(
                    getattr(model, name).parameters(), getattr(global_model, name).parameters(), strict=True
                ):
                    p.grad += coefficient * (p - p0)
            for name in fisher:
                fisher[name] += getattr(model, name).weight.grad.square()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        rows.append([loss.item(), score_a, score_v, beta, beta2])
        opt.step()
    return rows, {m: float(f.mean()) for m, f in zip(("audio", "visual"), fisher.values(), strict=True)}, grads


class Record(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, *args):
        m = trainer.callback_metrics
        tag = "mmbalance/inforeg/"
        self.rows.append(
            [float(outputs["loss"]), *(4 * float(m[f"{tag}score/{x}"]) for x in ("audio", "visual"))]
            + [float(m[f"{tag}coefficient/{x}"]) for x in ("audio", "visual")]
        )


def run_callback(model: Official, **kwargs):
    record, spy = Record(), GradSpy()
    callback = InfoReg(encoders=PATHS, **kwargs)
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[callback, spy, record]))
    trainer.fit(model, train_dataloaders=DataLoader(batches(), batch_size=None))
    return callback, record.rows, spy.steps


I7_ROWS = [
    [3.893572653738, 1.041645352901, 1.326404394131, 0, 0.1319567373481],
    [2.889843809228, 1.692000743792, 1.329838170871, 1.344233778053, 0],
    [3.932584215485, 0.9903526316509, 1.348945479075, 0, 0.1410541924561],
]
I7_PARAMS = {
    "audio_net.weight": [[0.6807920365827, -0.2344733388427], [0.1958570565786, 0.6057906734699]],
    "audio_net.bias": [0.1022995711198, -0.1061182730923],
    "visual_net.weight": [[0.03613279328172, 0.144139919058], [-0.06292664227917, -0.08689079059059]],
    "head.weight": [
        [0.4433934011818, -0.1028100232095, 0.1894997722627, 0.09864890533822],
        [-0.1206903526184, 0.1353245188063, -0.1068377275051, 0.2939932450054],
        [-0.02271987841937, 0.2674686745472, 0.3173155154343, -0.3926421503436],
    ],
    "head.bias": [0.06778132140751, -0.04562158444636, -0.02215973696115],
}


def test_i7_official_epoch_golden_values():
    model = Official()
    rows, traces, grads = official_epoch(model)
    close(rows, I7_ROWS)
    close(grads[1]["audio_net.weight"], [[-0.5712556119614, 0.2850396000818], [0.7737255833711, -0.3882538442445]])
    close(grads[1]["audio_net.bias"], [0.1733045169141, -0.2317785455782])
    close(grads[2]["visual_net.weight"], [[-0.01857705071065, -0.1407038800103], [0.06570685853044, 0.6682304751227]])
    close([traces["audio"], traces["visual"]], [0.7973629135327, 0.1548715782316])
    for name, value in I7_PARAMS.items():
        close(dict(model.named_parameters())[name].detach(), value)


def test_i7_callback_equals_the_official_epoch():
    official = Official()
    rows, traces, grads = official_epoch(official)
    callback, seen, spied = run_callback(model := Official())
    close(seen, rows, rtol=1e-6)  # logged values are float32
    close(list(callback._history.values()), [[traces["audio"]], [traces["visual"]]])
    for step, expected in zip(spied, grads, strict=True):
        for name, grad in expected.items():
            close(step[name], grad)
    assert_states_close(params_of(model), params_of(official), atol=1e-12)
    assert inforeg_growth(callback._history["audio"]) == 1.0


def test_i7_trace_without_regulation_and_update_mode():
    callback, _, _ = run_callback(model := Official(), trace_includes_regulation=False)
    close(list(callback._history.values()), [[0.7555911027712], [0.1562006712042]])
    for name, value in I7_PARAMS.items():
        close(dict(model.named_parameters())[name].detach(), value)
    _, rows, _ = run_callback(update := Official(), modulate="update")
    close([row[3:] for row in rows], [row[3:] for row in I7_ROWS], rtol=1e-6)
    close(update.audio_net.weight.detach(), [[0.6788945128538, -0.2280260014465], [0.1983857574257, 0.5971939009922]])
    close(update.audio_net.bias.detach(), [0.1045468244364, -0.1091146511749])
    for name in ("visual_net.weight", "head.weight", "head.bias"):
        close(dict(update.named_parameters())[name].detach(), I7_PARAMS[name])


def test_i7_update_mode_equals_gradient_mode_without_momentum():
    run_callback(gradient := Official(momentum=0.0))
    run_callback(update := Official(momentum=0.0), modulate="update")
    assert_states_close(params_of(update), params_of(gradient), atol=1e-14)


# ------------------------------------------------------------------------------- the callback: window, state, errors
class Coefficients(pl.Callback):
    """Every step's logged coefficients and the epochs' windows."""

    def __init__(self):
        self.steps, self.windows = [], {}

    def on_train_batch_end(self, trainer, *args):
        m = trainer.callback_metrics
        self.steps.append([float(m[f"mmbalance/inforeg/coefficient/{x}"]) for x in ("a", "b")])

    def on_train_epoch_end(self, trainer, *args):
        self.windows[trainer.current_epoch] = [
            float(trainer.callback_metrics[f"mmbalance/inforeg/window/{x}"]) for x in "ab"
        ]


def test_paper_window_leaves_the_first_two_epochs_alone():
    """``window_size=1, pad_history=False``: no window before two traces exist, so epochs 0-1 train as without it."""
    record, before, after = Coefficients(), GradSpy(), GradSpy()
    callback = InfoReg(scale=1.0, window_size=1, pad_history=False, threshold=-0.99)
    fit([before, callback, after, record], model=TinyModel(momentum=0.9), max_epochs=3)
    assert record.windows == {0: [0.0, 0.0], 1: [0.0, 0.0], 2: [1.0, 1.0]}
    per_epoch = len(record.steps) // 3
    assert all(c == [0.0, 0.0] for c in record.steps[: 2 * per_epoch])
    assert all(max(c) > 0 for c in record.steps[2 * per_epoch :])
    for seen, result in zip(before.steps[: 2 * per_epoch], after.steps, strict=False):
        assert all(torch.equal(seen[n], result[n]) for n in seen)
    assert [len(h) for h in callback._history.values()] == [3, 3]


@pytest.mark.parametrize("window_trace", ["own", "b"])
def test_window_trace_choice(window_trace):
    callback = InfoReg(window_size=1, pad_history=False, window_trace=window_trace)
    callback._history = {"a": [1.0, 2.0], "b": [2.0, 1.0]}
    callback._encoders = {"a": nn.Linear(1, 1), "b": nn.Linear(1, 1)}
    growth, is_open = callback._window(2)
    assert growth == ({"a": 0.5, "b": -1.0} if window_trace == "own" else {"a": -1.0, "b": -1.0})
    assert is_open == {"a": window_trace == "own", "b": False}


class Resumable:
    """TinyData's training batches, resumable in the middle of an epoch (Lightning restores its position)."""

    def __init__(self):
        self.loader = DataLoader(make_data(64), batch_size=8)
        self.start = self.taken = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        start, self.start = self.start, 0
        for i, batch in enumerate(self.loader):
            if i >= start:
                self.taken = i + 1
                yield batch

    def state_dict(self):
        return {"taken": self.taken}

    def load_state_dict(self, state):
        self.start = state["taken"]


def test_resume_mid_epoch_is_exact(tmp_path):
    """A checkpoint in the middle of an epoch holds the anchors and the partial trace: the resumed fit is the same."""

    def run(model, ckpt_path=None, **kwargs):
        callback = InfoReg(window_size=1)
        kw = trainer_kwargs(callbacks=[callback, *kwargs.pop("extra", [])], max_epochs=3, **kwargs)
        pl.Trainer(**kw).fit(model, train_dataloaders=Resumable(), ckpt_path=ckpt_path)
        return callback

    uninterrupted = run(full := TinyModel(momentum=0.9))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=12, save_top_k=-1)
    run(TinyModel(momentum=0.9), max_steps=12, enable_checkpointing=True, extra=[checkpoint])
    path = tmp_path / "epoch=1-step=12.ckpt"
    saved = next(v for k, v in torch.load(path, weights_only=False)["callbacks"].items() if k.startswith("InfoReg"))
    assert saved["trace_epoch"] == saved["anchor_epoch"] == 1 and saved["epoch_trace"]["a"] > 0
    assert set(saved["anchors"]) == {"a", "b"} and len(saved["history"]["a"]) == 1
    resumed = run(model := TinyModel(momentum=0.9, seed=5), ckpt_path=path, enable_checkpointing=True)
    assert_states_close(params_of(model), params_of(full), atol=0)
    for m, history in uninterrupted._history.items():  # the partial trace is summed in another order
        assert resumed._history[m] == pytest.approx(history, rel=1e-14)


def test_anchors_after_relearning_are_the_reinitialised_weights():
    """DiagnosingRelearning moves the encoders at the epoch start; InfoReg anchors after it, in either order."""

    class Anchors(pl.Callback):
        def __init__(self, inforeg):
            self.inforeg, self.seen = inforeg, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0 and trainer.current_epoch == 2:
                params = dict(self.inforeg._named["a"])
                self.seen = [
                    (a, params[n].detach().clone())
                    for (n, _), a in zip(self.inforeg._named["a"], self.inforeg._anchors["a"], strict=True)
                ]

    for relearn_first in (True, False):
        inforeg, relearn = InfoReg(scale=1.0), DiagnosingRelearning(every_n_epochs=1, strength=10.0)
        probe = Anchors(inforeg)
        callbacks = [relearn, inforeg] if relearn_first else [inforeg, relearn]
        fit([*callbacks, probe], model=TinyModel(momentum=0.9), max_epochs=3, limit_val_batches=1.0)
        assert relearn._n_reinits == 1 and probe.seen
        for anchor, param in probe.seen:
            assert torch.equal(anchor, param)


def test_fused_loss_only_composes_with_a_loss_weighting_method():
    """With ``unimodal_loss_weight=0`` InfoReg sets no loss weights, so Gradient Blending sets them."""
    blend = GradientBlending(super_epoch=1, estimator="joint")
    trainer, _ = fit([InfoReg(unimodal_loss_weight=0.0), blend], max_epochs=2, limit_val_batches=1.0)
    assert "mmbalance/inforeg/coefficient/a" in trainer.callback_metrics
    assert InfoReg(unimodal_loss_weight=0.0).loss_weights(trainer, trainer.lightning_module) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": (1.0, 2.0, 3.0)}, r"InfoReg: `scale` must hold 1 to 2 values \(one per modality \['a', 'b'\]\)"),
        (
            {"scale": {"a": 1.0, "c": 1.0}},
            r"InfoReg: `scale` must give a value for exactly the modalities \['a', 'b'\]",
        ),
        ({"window_trace": "c"}, r"InfoReg: `window_trace` must be 'first', 'own' or one of the modalities"),
        ({"trace_filter": lambda name, p: False}, r"InfoReg: `trace_filter=.*` selects no tensor of the 'a' encoder"),
    ],
)
def test_setup_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit([InfoReg(**kwargs)], max_steps=1)


def test_adaptive_optimizer_warning_says_what_the_pull_becomes():
    with pytest.warns(UserWarning, match=r"InfoReg adds its proximal pull .* Adam normalises .*modulate='update'"):
        fit([InfoReg()], model=TinyModel(optimizer="adam", lr=0.01), max_steps=1)


class ShardedResumable(Resumable):
    """Resumable batches of 4 per rank: rank r takes samples r, r + 2, ... (as TinyData's sampler does)."""

    def __iter__(self):
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.loader = DataLoader(Subset(make_data(64), range(rank, 64, world)), batch_size=8 // world)
        return super().__iter__()


class ShardedTraceProbe(pl.Callback):
    """``inforeg_trace_term`` of sharded gradients (a collective) equals that of the gathered ones, at every step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.encoders["a"].parameters() if p.ndim >= 2]
        assert is_sharded(grads[0])
        sharded, whole = inforeg_trace_term(grads), inforeg_trace_term([g.full_tensor() for g in grads])
        assert sharded == pytest.approx(whole, rel=1e-12)


@pytest.mark.ddp
def test_fsdp2_resume_mid_epoch_is_exact(tmp_path):
    """Under FSDP2 the anchors are saved whole and re-sharded on load; the resumed run equals an uninterrupted one."""

    def run(folder, ckpt_path=None, **kwargs):
        folder.mkdir()
        callbacks = [InfoReg(window_size=1), AssertSharded(), SaveFullParams(folder), *kwargs.pop("extra", [])]
        kw = trainer_kwargs(callbacks=callbacks, max_epochs=3, strategy=ForkModelParallel(), devices=2, **kwargs)
        pl.Trainer(**kw).fit(
            ShardedTinyModel(momentum=0.9, seed=0 if ckpt_path is None else 5),
            train_dataloaders=ShardedResumable(),
            ckpt_path=ckpt_path,
        )
        return load_ranks(folder)

    full0, _ = run(tmp_path / "full", extra=[ShardedTraceProbe()])
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=12, save_top_k=-1)
    run(tmp_path / "part", max_steps=12, enable_checkpointing=True, extra=[checkpoint])
    resumed0, resumed1 = run(tmp_path / "resumed", ckpt_path=tmp_path / "ckpt" / "epoch=1-step=12.ckpt")
    assert_states_close(resumed0, resumed1, atol=0)
    assert_states_close(resumed0, full0, atol=0)
