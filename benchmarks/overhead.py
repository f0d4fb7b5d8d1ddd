"""Per-step overhead of every balancing callback against a plain step with the same loss.

All configurations train the same mid-size model (two MLP encoders of about 0.8M parameters each, batch 256) in one
process, interleaved round by round, and the median step time of each is compared with the median of its reference:
a plain step with the same loss and no callback or, for a method with work it cannot do without, that plain step plus
a minimal implementation of the work (the method's limit): AGM's masked forwards, their head gradient and one pass
scaling the gradients; InfoReg's Fisher trace and proximal pull; OPM's pre-pass and feature-drop hook. The overhead
column is what the callback adds to its reference; "vs its plain step" is the whole cost. A step is timed from
``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, the callbacks' hooks and the optimizer step.

"plain (L_f), again" times the plain step a second time: its distance from 1 is the noise of the run. On a shared
2-core CPU, 5 rounds can be several percent off; 25 rounds of 15 steps bring it within about 1%.

    python benchmarks/overhead.py                 # CPU, all methods
    python benchmarks/overhead.py --rounds 7 --steps 30 --accelerator gpu --precision 16-mixed
    python benchmarks/overhead.py --ddp           # also 2-process DDP throughput relative to 1 process (CPU)

Results are printed as a Markdown table (and written to ``--output`` as JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_mmbalance import (
    AGM,
    ARL,
    OGMGE,
    OPM,
    DiagnosingRelearning,
    GradientBlending,
    InfoReg,
    MMPareto,
    ModalityMonitor,
    MultimodalOutput,
)
from lightning_mmbalance.callbacks import BalancingCallback, StepStatistics, UnimodalLosses
from lightning_mmbalance.callbacks.agm import _without_graph
from lightning_mmbalance.callbacks.heldout import eval_mode
from lightning_mmbalance.functional.agm import agm_masked_coalitions
from lightning_mmbalance.functional.inforeg import _inforeg_trace_update
from lightning_mmbalance.masking import masked_forward
from lightning_mmbalance.models import LateFusionClassifier

DIM, HIDDEN, FEATURE, CLASSES = 1024, 640, 256, 10
VAL_BATCHES = 2


class Timer(Callback):
    """Step times from ``on_train_batch_start`` to ``on_train_batch_end``: wall time, or with ``clock="cpu"`` the
    process's CPU time (all threads), which time-slicing by other processes on a shared CPU does not inflate."""

    def __init__(self, skip: int, clock: str = "wall") -> None:
        self.skip = skip
        self.times: list[float] = []
        self._start = 0.0
        self._sync: Callable[[], None] = lambda: None
        self._now = time.process_time if clock == "cpu" else time.perf_counter

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            self._sync = torch.cuda.synchronize

    def start(self) -> None:
        self._sync()
        self._start = self._now()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._sync()
        if trainer.global_step > self.skip:
            self.times.append(self._now() - self._start)


class StartTimer(Callback):
    """Starts a :class:`Timer` in ``on_train_batch_start``; placed before the callbacks, so that their own
    ``on_train_batch_start`` work (OPM's pre-pass) is timed, while the Timer itself stops after theirs at the end."""

    def __init__(self, timer: Timer) -> None:
        self.timer = timer

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.timer.start()


class PlainManual(LateFusionClassifier):
    """The reference of the official procedure: manual optimisation, one backward of L_f + sum L_m."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def _losses(self, batch: Any) -> dict[str, torch.Tensor]:
        out: MultimodalOutput = self(batch)
        ce = torch.nn.functional.cross_entropy
        return {"fused": ce(out.logits, out.targets), **{m: ce(z, out.targets) for m, z in out.unimodal_logits.items()}}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(sum(self._losses(batch).values()))
        opt.step()


class OfficialMMPareto(PlainManual):
    """The official MMPareto procedure: three recorded backward passes, then a fourth for the sum (manual)."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        losses = self._losses(batch)
        enc = {m: list(self.encoders[m].parameters()) for m in self.encoders}
        recorded: dict[str, dict[str, list[torch.Tensor]]] = {}
        for key, loss in losses.items():
            opt.zero_grad()
            self.manual_backward(loss, retain_graph=True)
            recorded[key] = {m: [p.grad.clone() for p in ps] for m, ps in enc.items() if key in ("fused", m)}
        opt.zero_grad()
        self.manual_backward(sum(losses.values()))
        for m, ps in enc.items():
            g_mm, g_u = recorded["fused"][m], recorded[m][m]
            flat_mm, flat_u = torch.cat([g.flatten() for g in g_mm]), torch.cat([g.flatten() for g in g_u])
            if torch.nn.functional.cosine_similarity(flat_mm, flat_u, dim=0) > 0:
                w_mm = 0.5
            else:
                v11, v12, v22 = flat_mm @ flat_mm, flat_mm @ flat_u, flat_u @ flat_u
                w_mm = float(torch.clamp((v22 - v12) / (v11 + v22 - 2 * v12), 0.001, 0.999))
            for p, a, b in zip(ps, g_mm, g_u, strict=True):
                n = 2 * w_mm * a + 2 * (1 - w_mm) * b
                r = p.grad.norm() / n.norm()
                p.grad = 1.5 * r * n if r > 1 else 1.5 * n
        opt.step()


class InfoRegTrace(UnimodalLosses):
    """InfoReg's unavoidable work, and nothing else: its loss (L_f + sum L_m) and each step's Fisher-trace terms."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.weights = {m: [p for p in self.encoder_parameters(m) if p.ndim >= 2] for m in self.modalities}
        self.running: torch.Tensor | None = None

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: StepStatistics) -> None:
        device = trainer.strategy.root_device
        grads = [[p.grad for p in params if p.grad is not None] for params in self.weights.values()]
        terms = torch.stack([_inforeg_trace_update(g, [t.numel() for t in g], "layer_mean", device) for g in grads])
        self.running = terms if self.running is None else self.running + terms


class InfoRegTraceAndPull(InfoRegTrace):
    """InfoReg's unavoidable work, and nothing else: its loss, the trace terms, the epoch-start weights of every encoder
    (the windows are all open in a first epoch), and each step the proximal pull of one encoder's gradient toward them
    (``g += c (theta - theta_0)``, two passes over the encoder; InfoReg pulls one of the two a step here)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.pulled = [list(self.encoder_parameters(m)) for m in self.modalities]
        self.anchors = [[p.detach().clone() for p in params] for params in self.pulled]

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: StepStatistics) -> None:
        i = trainer.global_step % len(self.pulled)
        grads = [p.grad for p in self.pulled[i] if p.grad is not None]
        torch._foreach_add_(grads, [p.detach() for p in self.pulled[i]], alpha=0.1)
        torch._foreach_add_(grads, self.anchors[i], alpha=-0.1)
        super().on_step(trainer, pl_module, stats)


class MaskedForwards(Callback):
    """AGM's masked forwards, and nothing else: the 2^N - 2 masked forwards of each micro-batch (eval, no graphs)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.batch = batch

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        encoders = dict(pl_module.encoders.items())
        with eval_mode(pl_module), trainer.precision_plugin.forward_context():
            for kept in agm_masked_coalitions(list(encoders)):
                masked_forward(pl_module, self.batch, set(encoders) - kept, encoders)


class AGMWork(BalancingCallback):
    """AGM's unavoidable work, and nothing else: the masked forwards; with ``head_gradient`` their graphs through the
    fusion head (encoders without graphs) and, after the backward, the head gradient of the masked passes along the
    backward's logit gradient (N - 1 vector-Jacobian products); then one pass scaling every gradient (fixed factors)
    and, with ``head_gradient``, the head gradient added to the head's."""

    method = "agm_work"
    requires_unimodal_logits = False

    def __init__(self, head_gradient: bool) -> None:
        super().__init__()
        self.head_gradient = head_gradient

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        encoder = [p for m in self.modalities for p in self.encoder_parameters(m)]
        self.shared = [p for p in pl_module.parameters() if all(p is not q for q in encoder)]
        self.params = encoder + self.shared

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.batch = batch

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        logits = self.take_record(pl_module).output.logits
        everything = frozenset(self.modalities)
        with (
            eval_mode(pl_module, grad=self.head_gradient),
            trainer.precision_plugin.forward_context(),
            _without_graph(self._encoders.values(), self.head_gradient),
        ):
            masked = [
                masked_forward(pl_module, self.batch, everything - kept, self._encoders).logits
                for kept in agm_masked_coalitions(self.modalities)
            ]
        if self.head_gradient:
            self.residuals = [z - masked[-1] for z in masked[: len(self.modalities) - 1]]
            self.handle = logits.register_hook(self.keep)

    def keep(self, grad: torch.Tensor) -> None:
        self.grad = grad

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.head_gradient:
            self.handle.remove()
            self.correction = [torch.zeros_like(p) for p in self.shared]
            for i, r in enumerate(self.residuals):
                grads = torch.autograd.grad(r, self.shared, self.grad, retain_graph=i < len(self.residuals) - 1)
                torch._foreach_add_(self.correction, grads)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], 0.9)
        if self.head_gradient:
            torch._foreach_add_([p.grad for p in self.shared if p.grad is not None], self.correction, alpha=0.1)


class FeatureDrop(Callback):
    """OPM's unavoidable work, and nothing else: a forward hook that zeroes samples of each encoder's output and scales
    the rest, and, with ``pre_pass``, first a forward without gradients of the micro-batch (the current scores)."""

    def __init__(self, pre_pass: bool) -> None:
        self.pre_pass, self.armed = pre_pass, False
        self.handles: list[Any] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.handles = [enc.register_forward_hook(self.drop) for enc in pl_module.encoders.values()]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self.handles:
            handle.remove()

    def drop(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not self.armed:
            return None
        keep = torch.rand(output.shape[0], 1, device=output.device) < 0.5
        return output * (keep.to(output.dtype) / 0.75)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self.pre_pass:
            with torch.no_grad(), trainer.precision_plugin.train_step_context():
                pl_module(batch)
        self.armed = True

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.armed = False


class WeightedLoss(UnimodalLosses):
    """A plain reference with ARL's loss (L_f + gamma * sum L_m) and nothing else."""

    def __init__(self, gamma: float) -> None:
        super().__init__()
        self.gamma = gamma

    def loss_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        return {"fused": 1.0, **dict.fromkeys(self.modalities, self.gamma)}


def configurations() -> dict[str, tuple[str, Callable[[], list[Callback]], type[LateFusionClassifier]]]:
    """name -> (name of its plain reference, callbacks factory, model class)."""
    base = LateFusionClassifier
    return {
        "plain (L_f)": ("plain (L_f)", list, base),
        "plain (L_f), again": ("plain (L_f)", list, base),  # the same step twice: the measurement's noise floor
        "plain (L_f + sum L_m)": ("plain (L_f + sum L_m)", lambda: [UnimodalLosses()], base),
        "plain (L_f + 4 sum L_m)": ("plain (L_f + 4 sum L_m)", lambda: [WeightedLoss(4.0)], base),
        "OGMGE(noise=False)": ("plain (L_f)", lambda: [OGMGE(noise=False)], base),
        "OGMGE(noise=True)": ("plain (L_f)", lambda: [OGMGE(noise=True)], base),
        "OGMGE(modulate='update')": ("plain (L_f)", lambda: [OGMGE(noise=False, modulate="update")], base),
        "ARL": ("plain (L_f + 4 sum L_m)", lambda: [ARL(warmup_epochs=0)], base),
        "GradientBlending(estimator='joint')": (
            "plain (L_f + sum L_m)",
            lambda: [GradientBlending(estimator="joint", max_batches=2)],
            base,
        ),
        "ModalityMonitor": ("plain (L_f)", lambda: [ModalityMonitor(masked_eval=False, shapley=False)], base),
        "ModalityMonitor(conflict every 10 steps)": (
            "plain (L_f)",
            lambda: [ModalityMonitor(conflict_every_n_steps=10, masked_eval=False, shapley=False)],
            base,
        ),
        "MMPareto": ("plain (L_f + sum L_m)", lambda: [MMPareto()], base),
        "plain (L_f + sum L_m) + InfoReg's trace": ("plain (L_f + sum L_m)", lambda: [InfoRegTrace()], base),
        "plain (L_f + sum L_m) + InfoReg's trace and pull": (
            "plain (L_f + sum L_m) + InfoReg's trace",
            lambda: [InfoRegTraceAndPull()],
            base,
        ),
        "InfoReg": ("plain (L_f + sum L_m) + InfoReg's trace and pull", lambda: [InfoReg()], base),
        "InfoReg(modulate='update')": (
            "plain (L_f + sum L_m) + InfoReg's trace and pull",
            lambda: [InfoReg(modulate="update")],
            base,
        ),
        "plain (L_f) + AGM's masked forwards": ("plain (L_f)", lambda: [MaskedForwards()], base),
        "plain (L_f) + AGM's masked forwards and scaling": (
            "plain (L_f) + AGM's masked forwards",
            lambda: [AGMWork(head_gradient=False)],
            base,
        ),
        "plain (L_f) + AGM's masked forwards, head gradient and scaling": (
            "plain (L_f) + AGM's masked forwards",
            lambda: [AGMWork(head_gradient=True)],
            base,
        ),
        "AGM": ("plain (L_f) + AGM's masked forwards, head gradient and scaling", lambda: [AGM()], base),
        "AGM(masked_graph='none')": (
            "plain (L_f) + AGM's masked forwards and scaling",
            lambda: [AGM(masked_graph="none")],
            base,
        ),
        "AGM(modulate='update')": (
            "plain (L_f) + AGM's masked forwards, head gradient and scaling",
            lambda: [AGM(modulate="update")],
            base,
        ),
        "AGM(masked_graph='full')": ("plain (L_f) + AGM's masked forwards", lambda: [AGM(masked_graph="full")], base),
        "plain (L_f) + OPM's drop hook": ("plain (L_f)", lambda: [FeatureDrop(pre_pass=False)], base),
        "plain (L_f) + OPM's pre-pass and drop hook": ("plain (L_f)", lambda: [FeatureDrop(pre_pass=True)], base),
        "OPM(p_exe=1)": (
            "plain (L_f) + OPM's pre-pass and drop hook",
            lambda: [OPM(modulation_starts=0, p_exe=1.0)],
            base,
        ),
        "OPM(p_exe=1, lagged=True)": (
            "plain (L_f) + OPM's drop hook",
            lambda: [OPM(modulation_starts=0, p_exe=1.0, lagged=True)],
            base,
        ),
        "plain manual (L_f + sum L_m)": ("plain manual (L_f + sum L_m)", list, PlainManual),
        "official MMPareto (3+1 backward)": ("plain manual (L_f + sum L_m)", list, OfficialMMPareto),
    }


def make_loader(batch: int, steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = batch * steps
    y = torch.randint(0, CLASSES, (n,), generator=g)
    a = torch.randn(n, DIM, generator=g) + torch.nn.functional.one_hot(y, DIM).float()
    b = torch.randn(n, DIM, generator=g)
    data = TensorDataset(a, b, y)
    return DataLoader(data, batch_size=batch, collate_fn=lambda items: _collate(items))


def _collate(items: list[tuple[torch.Tensor, ...]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    a, b, y = (torch.stack(t) for t in zip(*items, strict=True))
    return {"a": a, "b": b}, y


def make_model(cls: type[LateFusionClassifier] = LateFusionClassifier, **kwargs: Any) -> LateFusionClassifier:
    """The benchmark model: two MLP encoders of about 0.8 M parameters each."""
    return cls({"a": [DIM], "b": [DIM]}, CLASSES, feature_dim=FEATURE, hidden_dim=HIDDEN, **kwargs)


def _trainer(args: argparse.Namespace, callbacks: list[Callback], **overrides: Any) -> pl.Trainer:
    kwargs: dict[str, Any] = dict(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=VAL_BATCHES,
        callbacks=callbacks,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def time_config(
    name: str, factory: Callable[[], list[Callback]], cls: type[LateFusionClassifier], args: argparse.Namespace
) -> tuple[list[float], float]:
    """Step times of one fit, and its peak CUDA memory in MiB (NaN on CPU)."""
    pl.seed_everything(0, verbose=False)
    model = make_model(cls, lr=1e-3)
    timer = Timer(skip=args.warmup, clock=args.clock)
    trainer = _trainer(args, [StartTimer(timer), *factory(), timer], max_steps=args.steps + args.warmup)
    cuda = args.accelerator in ("gpu", "cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(
        model,
        train_dataloaders=make_loader(args.batch, args.steps + args.warmup),
        val_dataloaders=make_loader(args.batch, VAL_BATCHES),
    )
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return timer.times, peak


def epoch_costs(args: argparse.Namespace) -> dict[str, float]:
    """Wall time of a 2-epoch fit with each epoch-level procedure, relative to a plain 2-epoch fit.

    Every configuration runs its procedure once in the two epochs: Gradient Blending one estimation round (at the
    start of epoch 0), Diagnosing & Re-learning one diagnosis (after epoch 1), the monitor's masked and Shapley
    evaluations at both validation epochs. The training epoch has ``--steps`` batches and validation 4.
    """
    configs: dict[str, Callable[[], list[Callback]]] = {
        "plain": list,
        "GradientBlending(estimator='copies', estimation_epochs=1)": lambda: [
            GradientBlending(super_epoch=2, estimation_epochs=1)
        ],
        "GradientBlending(estimator='joint')": lambda: [GradientBlending(super_epoch=2, estimator="joint")],
        "DiagnosingRelearning(every_n_epochs=1)": lambda: [DiagnosingRelearning(every_n_epochs=1)],
        "ModalityMonitor(masked_eval, shapley)": lambda: [ModalityMonitor()],
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(max(1, args.rounds // 2)):
        for name, factory in configs.items():
            pl.seed_everything(0, verbose=False)
            model = make_model()
            trainer = _trainer(args, factory(), max_epochs=2, limit_val_batches=4)
            start = time.perf_counter()
            trainer.fit(
                model,
                train_dataloaders=make_loader(args.batch, args.steps),
                val_dataloaders=make_loader(args.batch, 4),
            )
            times[name].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    return {name: statistics.median(ts) / plain for name, ts in times.items() if name != "plain"}


def encoder_parameters() -> dict[str, int]:
    model = make_model()
    return {m: sum(p.numel() for p in e.parameters()) for m, e in model.encoders.items()}


def ddp_throughput(args: argparse.Namespace) -> dict[str, float]:
    """Samples per second of 2-process DDP (ddp_fork, gloo) relative to 1 process, plain and with OGM-GE."""
    out = {}
    for label, factory in (("plain", list), ("OGMGE", lambda: [OGMGE()])):
        rates = {}
        for devices in (1, 2):
            pl.seed_everything(0, verbose=False)
            model = make_model()
            trainer = _trainer(
                args,
                factory(),
                accelerator="cpu",
                precision="32-true",
                devices=devices,
                strategy="ddp_fork" if devices > 1 else "auto",
                max_steps=args.steps,
                limit_val_batches=0,
            )
            start = time.perf_counter()
            trainer.fit(model, train_dataloaders=make_loader(args.batch, args.steps * devices))
            rates[devices] = args.batch * args.steps * devices / (time.perf_counter() - start)
        out[label] = rates[2] / rates[1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over all steps)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each fit")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--only", nargs="*", help="configuration names to run (their references are added)")
    parser.add_argument("--ddp", action="store_true", help="also measure 2-process DDP throughput (CPU)")
    parser.add_argument("--epochs", action="store_true", help="also measure the epoch-level procedures' cost")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="step time: wall clock, or the process's CPU time (CPU only; for a machine shared with other jobs)",
    )
    args = parser.parse_args()

    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    configs = configurations()
    if args.only:
        wanted, todo = set(), list(args.only)
        while todo:  # each configuration with its reference, and the reference's own reference
            name = todo.pop()
            if name not in wanted:
                wanted.add(name)
                todo.append(configs[name][0])
        configs = {k: v for k, v in configs.items() if k in wanted}
    times: dict[str, list[float]] = {name: [] for name in configs}
    peaks: dict[str, float] = {}
    for r in range(args.rounds):
        for name, (_, factory, cls) in configs.items():
            step_times, peaks[name] = time_config(name, factory, cls, args)
            times[name] += step_times
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else platform.processor() or platform.machine()
    print(
        f"\nModel: two MLP encoders {encoder_parameters()} parameters, batch {args.batch}, {args.precision}, "
        f"{args.accelerator} ({device}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"{args.rounds} rounds x {args.steps} steps, {args.clock} time\n"
    )
    print("| configuration | median step (ms) | relative to | overhead | vs its plain step | peak CUDA memory (MiB) |")
    print("|---|---|---|---|---|---|")
    result: dict[str, Any] = {}
    for name, (ref, _, _) in configs.items():
        rel = medians[name] / medians[ref]
        root = ref
        while configs[root][0] != root:  # the plain step at the start of the chain of references
            root = configs[root][0]
        total = medians[name] / medians[root]
        result[name] = {
            "median_ms": 1000 * medians[name],
            "reference": ref,
            "relative": rel,
            "plain": root,
            "relative_to_plain": total,
            "peak_mib": peaks[name],
        }
        peak = "n/a (CPU)" if peaks[name] != peaks[name] else f"{peaks[name]:.0f}"
        print(f"| {name} | {1000 * medians[name]:.2f} | {ref} | {rel:.3f}x | {total:.3f}x | {peak} |")
    if args.epochs:
        costs = epoch_costs(args)
        result["two_epoch_fit_relative_to_plain"] = costs
        print("\n| epoch-level procedure | 2-epoch fit time relative to plain |\n|---|---|")
        for name, rel in costs.items():
            print(f"| {name} | {rel:.2f}x |")
    if args.ddp:
        ddp = ddp_throughput(args)
        result["ddp_2proc_over_1proc"] = ddp
        print(
            "\n2-process DDP (ddp_fork, gloo) throughput relative to 1 process: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in ddp.items())
        )
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
