import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_mmbalance import ARL, MultimodalOutput, multimodal_loss
from lightning_mmbalance.functional import arl_coefficients
from tests.helpers.tiny import TinyData, TinyModel, assert_states_close, trainer_kwargs
from tests.helpers.tiny import fit as _fit


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def close(actual, expected):
    """The golden values have 10 decimals: agree to 1e-10 (plus their rounding)."""
    torch.testing.assert_close(actual, t(expected), atol=2e-10, rtol=0)


Z_A = [[2.0, 0.5, -1.0], [0.2, 1.5, 0.1], [-0.5, 0.3, 1.2], [1.0, -1.0, 0.0]]
Z_V = [[0.3, 0.1, -0.2], [0.0, 0.4, 0.2], [0.1, -0.1, 0.5], [0.6, 0.0, -0.3]]
Z_T = [[0.5, 0.5, 0.0], [1.0, 0.0, -1.0], [0.0, 0.2, 0.1], [0.3, 0.3, 0.3]]


# ------------------------------------------------------------------------------------------- golden values A1, A2, A6
def test_a1_floor_inactive():
    a = arl_coefficients({"a": t(Z_A), "v": t(Z_V)}, temperature=8)
    assert list(a.values()) == pytest.approx([0.1686517507, 0.8313482493], abs=1e-9)


def test_a2_floor_active():
    z_a = [[9, 0, -3], [0, 8, 0], [-2, 0, 10], [7, -4, 0]]
    a = arl_coefficients({"a": t(z_a), "v": t(Z_V)}, temperature=8)
    assert list(a.values()) == pytest.approx([0.2038813140, 0.7961186860], abs=1e-9)


def test_a6_three_modalities_and_reduction_to_two():
    a = arl_coefficients({"a": t(Z_A), "v": t(Z_V), "t": t(Z_T)}, temperature=8)
    assert list(a.values()) == pytest.approx([0.2959577877, 0.3715402555, 0.3325019568], abs=1e-9)
    assert sum(a.values()) == pytest.approx(1.0, abs=1e-12)


def test_float32_inputs():
    a = arl_coefficients({"a": t(Z_A).float(), "v": t(Z_V).float()}, temperature=8)
    assert list(a.values()) == pytest.approx([0.1686517507, 0.8313482493], rel=1e-5)


def test_guards_equal_shares():
    zeros = torch.zeros(4, 3, dtype=torch.float64)
    a = arl_coefficients({"a": zeros, "v": zeros}, temperature=8)
    assert list(a.values()) == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"unimodal_logits": {"a": torch.zeros(4, 3)}}, "at least 2 modalities"),
        ({"unimodal_logits": {"a": torch.zeros(4, 3), "v": torch.zeros(3, 3)}}, "one common B"),
        ({"temperature": -1.0}, "`temperature` must be a finite float >= 0, got -1.0"),
        ({"entropy_floor": 1.0}, r"`entropy_floor` must be in \[0, 1\), got 1.0"),
    ],
)
def test_functional_errors(kwargs, match):
    args = {"unimodal_logits": {"a": t(Z_A), "v": t(Z_V)}, "temperature": 8.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        arl_coefficients(**args)


# ---------------------------------------------------------------------------------------------- A3-A5: tiny model
X_A = [[1, 0], [0.5, -1], [0, 2], [-1, 1]]
X_V = [[0.2, 0.4], [1, 0], [-0.3, 0.8], [0.5, 0.5]]
BATCH = ((t(X_A), t(X_V)), torch.tensor([0, 1, 2, 0]))


class ARLTiny(pl.LightningModule):
    """Bias-free linear encoders, one linear fusion layer on the concatenation, whole bias in unimodal logits."""

    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({"a": nn.Linear(2, 2, bias=False), "v": nn.Linear(2, 2, bias=False)})
        self.fc = nn.Linear(4, 3)
        self.double()  # before the copies, so the weights are exactly the golden decimals
        with torch.no_grad():
            self.encoders["a"].weight.copy_(t([[0.5, -0.2], [0.1, 0.3]]))
            self.encoders["v"].weight.copy_(t([[0.05, 0.1], [-0.1, 0.02]]))
            self.fc.weight.copy_(t([[0.4, -0.3, 0.2, 0.1], [-0.2, 0.5, -0.1, 0.3], [0.1, 0.1, 0.3, -0.4]]))
            self.fc.bias.copy_(t([0.05, -0.05, 0.0]))
        self.losses: list[float] = []
        self.grads: list[dict[str, torch.Tensor]] = []

    def forward(self, batch):
        (x_a, x_v), y = batch
        h_a, h_v = self.encoders["a"](x_a), self.encoders["v"](x_v)
        zeros = torch.zeros_like(h_a)
        uni = {"a": self.fc(torch.cat((h_a, zeros), 1)), "v": self.fc(torch.cat((zeros, h_v), 1))}
        return MultimodalOutput(self.fc(torch.cat((h_a, h_v), 1)), uni, y)

    def training_step(self, batch, batch_idx):
        loss = multimodal_loss(self, self(batch))
        self.losses.append(float(loss))
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in self.named_parameters()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: every step sees the same weights


def _run(cb, steps=1):
    model = ARLTiny()
    trainer = pl.Trainer(**trainer_kwargs(callbacks=[cb], max_steps=steps))
    trainer.fit(model, train_dataloaders=DataLoader([BATCH] * steps, batch_size=None))
    return model, trainer


DW_A_UNSCALED = [[0.3216295726, -1.0315047830], [-0.4288394302, 1.3753397107]]
DW_V_UNSCALED = [[0.3190058028, -0.2383090449], [-0.6387872672, 0.2844096153]]


def test_a3_scaled_gradients():
    model, trainer = _run(ARL(gamma=4, temperature=8, warmup_epochs=0))
    g = model.grads[0]
    assert model.losses[0] == pytest.approx(10.465366066498927, abs=1e-12)
    close(g["encoders.a.weight"], [[0.3538749666, -1.1349196458], [-0.4718332888, 1.5132261944]])
    close(g["encoders.v.weight"], [[0.6060292611, -0.4527261044], [-1.2135320803, 0.5403053722]])
    dw = [
        [0.3908081841, -0.2187495114, -0.0531983906, 0.0166156522],
        [-0.8329109590, 0.7055454141, 0.0330011335, 0.0875129899],
        [0.4421027748, -0.4867959027, 0.0201972571, -0.1041286421],
    ]
    close(g["fc.weight"], dw)
    close(g["fc.bias"], [-1.4568113219, 0.7095117637, 0.7472995582])
    ratio = g["encoders.a.weight"] / t(DW_A_UNSCALED)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1.1002563095), atol=1e-9, rtol=0)
    metrics = trainer.callback_metrics
    assert float(metrics["mmbalance/arl/coefficient/a"]) == pytest.approx(0.1002563095, abs=1e-6)
    assert float(metrics["mmbalance/arl/contribution/a"]) == pytest.approx(0.7788615519, abs=1e-6)
    assert float(metrics["mmbalance/arl/entropy/v"]) == pytest.approx(1.0971552239, abs=1e-6)
    assert float(metrics["mmbalance/arl/ideal_share/a"]) == pytest.approx(0.5045640604, abs=1e-6)


def test_a4_warmup():
    model, trainer = _run(ARL(gamma=4, temperature=8, warmup_epochs=1))
    g = model.grads[0]
    assert model.losses[0] == pytest.approx(3.5337281109, abs=1e-10)
    close(g["encoders.a.weight"], [[0.1284821132, -0.4121240436], [-0.1713094842, 0.5494987247]])
    close(g["encoders.v.weight"], [[0.1304091171, -0.1015117643], [-0.2567444093, 0.1186337396]])
    assert float(trainer.callback_metrics["mmbalance/arl/coefficient/a"]) == 0.0
    assert float(trainer.callback_metrics["mmbalance/arl/contribution/a"]) > 0  # diagnostics during warm-up


def test_a5_lag_over_two_steps():
    lagged, _ = _run(ARL(gamma=4, temperature=8, warmup_epochs=0, lagged=True), steps=2)
    first = lagged.grads[0]
    close(first["encoders.a.weight"], [[0.4824443590, -1.5472571745], [-0.6432591453, 2.0630095660]])
    close(first["encoders.v.weight"], [[0.4785087042, -0.3574635673], [-0.9581809007, 0.4266144230]])
    current, _ = _run(ARL(gamma=4, temperature=8, warmup_epochs=0, lagged=False), steps=2)
    for step in (0, 1):  # unlagged: the A3 coefficients at every step
        torch.testing.assert_close(
            current.grads[step]["encoders.a.weight"] / t(DW_A_UNSCALED),
            torch.full((2, 2), 1.1002563095, dtype=torch.float64),
        )
    # lagged, second step: the A3 coefficients stored at the first step
    torch.testing.assert_close(lagged.grads[1]["encoders.a.weight"], current.grads[0]["encoders.a.weight"])
    torch.testing.assert_close(lagged.grads[1]["encoders.v.weight"], current.grads[0]["encoders.v.weight"])


# ---------------------------------------------------------------------------------------------- Lightning machinery
def arl(**kw):
    return ARL(**{"warmup_epochs": 1, "temperature": 8.0, **kw})


@pytest.mark.parametrize("lagged", [False, True])
def test_resume_is_exact(tmp_path, lagged):
    _, full = _fit([arl(lagged=lagged)], max_epochs=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit([arl(lagged=lagged), ckpt], max_epochs=2, enable_checkpointing=True, default_root_dir=tmp_path)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    (saved,) = [v for k, v in state.items() if k.startswith("ARL")]
    assert (saved["stored_coefficients"] is not None) == lagged
    trainer = pl.Trainer(
        **trainer_kwargs(
            callbacks=[arl(lagged=lagged)], max_epochs=4, enable_checkpointing=True, default_root_dir=tmp_path
        )
    )
    resumed = TinyModel(seed=9)
    trainer.fit(resumed, datamodule=TinyData(), ckpt_path=tmp_path / "last.ckpt")
    assert_states_close(resumed.state_dict(), full.state_dict(), atol=0)


def test_three_modalities():
    dims = {"a": 4, "b": 6, "c": 3}
    trainer, _ = _fit([arl(warmup_epochs=0)], model=TinyModel(dims=dims), data=TinyData(dims=dims), max_steps=2)
    total = sum(float(trainer.callback_metrics[f"mmbalance/arl/coefficient/{m}"]) for m in dims)
    assert total == pytest.approx(1.0, abs=1e-6)
