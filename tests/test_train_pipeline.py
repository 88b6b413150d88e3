"""Pipeline training on real agent processes: results do not depend on the spread.

A coordinator runs in the test process and drives hand-made plans; four agents are
real processes. GPipe and 1F1B over 1 agent, 2 stages, and 3 stages with stage 0
replicated give the same parameters and losses as one process (and, for the first
step, as transformers); skip-and-swap paths give each stage the gradient of the
micro-batches that visited it, computed through the same layer order in one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from edgecluster.model_config import ModelConfig
from edgecluster.plan.pipeline import PipelineOptions
from edgecluster.plan.pipeline_cost import pipeline_costs
from edgecluster.plan.pipeline_paths import Hop, MicroBatchPath
from edgecluster.plan.pipeline_sim import simulate
from edgecluster.train.model import FullModel, load_stage_weights, read_hf_weights
from edgecluster.train.session import TrainingSession
from edgecluster.train.spec import Hyper, TrainingSpec, spec_from_plan
from edgecluster.train.units import Baseline, state_to_named, unit_names
from edgecluster.weights.checkpoint import Checkpoint
from tests.procs import ProcessPool, module_procs  # noqa: F401 (fixture)
from tests.train_harness import TrainHarness, batches, cluster, hand_plan, save_tiny

AGENTS = ("ta", "tb", "tc", "td")
MICRO, SEQ, M, STEPS = 2, 16, 4, 3
# AdamW's first step is about lr * sign(gradient): with a tiny eps, float noise in a
# near-zero gradient flips a whole update. A larger eps keeps the comparison smooth.
EPS = 1e-3


@pytest.fixture(scope="module")
def harness(module_procs: ProcessPool) -> Iterator[TrainHarness]:  # noqa: F811
    h = TrainHarness(module_procs, AGENTS)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelConfig]:
    path = save_tiny(tmp_path_factory.mktemp("tiny") / "model", layers=2, tied=True)
    with Checkpoint(path) as ckpt:
        return path, ckpt.model_config


def _params(session: TrainingSession, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    names = unit_names(cfg)
    out: dict[str, torch.Tensor] = {}
    for unit, state in session.gather(sorted(names)).items():
        out.update(state_to_named(names[unit], state)[0])
    return out


def _train(
    harness: TrainHarness, path: Path, cfg: ModelConfig, layout: list, schedule: str, data: list
) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Losses, parameters after the first step and after the last."""
    options = PipelineOptions(schedule=schedule, micro_batch_size=MICRO, num_micro_batches=M,
                              seq_len=SEQ)  # fmt: skip
    plan = hand_plan(cfg, layout, options)
    hyper = Hyper(lr=1e-2, eps=EPS, micro_batch_size=MICRO, seq_len=SEQ, num_micro_batches=M)
    session = harness.session(plan, cfg, hyper)
    try:
        assert (
            session.initialize(step=0, baseline=Baseline(kind="weights", path=path), cfg=cfg) == 0
        )
        losses, first = [], {}
        for step in range(STEPS):
            result = session.iterate(step, lambda mb, step=step: data[step * M + mb])
            losses.append(result.loss)
            if step == 0:
                first = _params(session, cfg)
        return losses, first, _params(session, cfg)
    finally:
        session.close(stop=True)


def _reference(path: Path, cfg: ModelConfig, data: list) -> tuple[list[float], dict, dict]:
    model = FullModel(cfg)
    load_stage_weights(model, read_hf_weights(path, list(model.hf_names().values())))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=EPS,
                            weight_decay=0.0, foreach=False)  # fmt: skip
    losses, first = [], {}
    for step in range(STEPS):
        total = 0.0
        for ids in data[step * M : (step + 1) * M]:  # per micro-batch, as the stages do
            loss = model.loss_sum(ids[:, :-1], ids[:, 1:])
            loss.backward()
            total += float(loss.detach())
        for p in model.parameters():
            assert p.grad is not None
            p.grad /= MICRO * SEQ * M
        opt.step()
        opt.zero_grad()
        losses.append(total / (MICRO * SEQ * M))
        if step == 0:
            first = {k: v.clone() for k, v in model.hf_state().items()}
    return losses, first, model.hf_state()


def _transformers_first_step(path: Path, data: list) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=EPS,
                            weight_decay=0.0, foreach=False)  # fmt: skip
    for ids in data[:M]:  # summed token losses per micro-batch, then the mean, as the stages
        logits = model(input_ids=ids[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    for p in model.parameters():
        assert p.grad is not None
        p.grad /= MICRO * SEQ * M
    opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], label: str) -> None:
    for name, want in b.items():
        if name not in a:
            continue  # transformers' tied lm_head.weight
        got = a[name]
        scale = want.abs().max().clamp_min(1e-6)
        err = float((got - want).abs().max() / scale)
        assert err <= 1e-5, f"{label}: {name} differs by {err:.2e} (relative)"


LAYOUTS = {
    "1 agent": [(0, 0, ["ta"]), (0, 2, ["ta"])],
    "2 stages": [(0, 0, ["ta"]), (0, 2, ["tb"])],
    "3 stages, stage 0 replicated": [(0, 0, ["ta", "tb"]), (0, 1, ["tc"]), (1, 2, ["td"])],
}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_result_does_not_depend_on_the_spread(
    harness: TrainHarness, tiny: tuple[Path, ModelConfig], schedule: str
) -> None:
    path, cfg = tiny
    data = batches(cfg, STEPS * M, MICRO, SEQ, seed=3)
    ref_losses, ref_first, ref_last = _reference(path, cfg, data)
    runs = {label: _train(harness, path, cfg, layout, schedule, data)
            for label, layout in LAYOUTS.items()}  # fmt: skip
    one_losses, one_first, one_last = runs["1 agent"]
    for label, (losses, first, last) in runs.items():
        assert losses == pytest.approx(ref_losses, rel=1e-5), f"{schedule}, {label}: losses"
        assert losses == pytest.approx(one_losses, rel=1e-5), f"{schedule}, {label}: losses"
        _close(first, ref_first, f"{schedule}, {label}, step 1, against one process")
        _close(last, one_last, f"{schedule}, {label}, step {STEPS}, against 1 agent")
        _close(last, ref_last, f"{schedule}, {label}, step {STEPS}, against one process")
    if schedule == "gpipe":
        _close(first, _transformers_first_step(path, data), "against transformers, step 1")


def _skip_spec(cfg: ModelConfig, rank_of: dict[str, int], hyper: Hyper) -> TrainingSpec:
    """Stage 0 on ta and tb; three one-layer-ish stages; paths that skip one stage
    and swap (3 before 2, 3 before 1), each stage visited by two of three micro-batches."""
    plan = hand_plan(
        cfg,
        [(0, 0, ["ta", "tb"]), (0, 1, ["tc"]), (1, 2, ["td"]), (2, 4, ["ta"])],
        PipelineOptions(schedule="gpipe", micro_batch_size=MICRO, num_micro_batches=3, seq_len=SEQ),
    )
    agent = {1: "tc", 2: "td", 3: "ta"}
    routes = {0: ("ta", [1, 2]), 1: ("tb", [3, 2]), 2: ("ta", [3, 1])}
    paths = [
        MicroBatchPath(
            micro_batch=mb,
            hops=(Hop(0, src), *(Hop(s, agent[s]) for s in stages), Hop(0, src)),
        )
        for mb, (src, stages) in routes.items()
    ]
    costs = pipeline_costs(cfg, micro_batch_size=MICRO, seq_len=SEQ)
    sim = simulate(paths=paths, allocation=plan.allocation, costs=costs, cluster=cluster(AGENTS))
    skipping = type(plan)(
        schedule="skippipe", options=plan.options, costs=costs, allocation=plan.allocation,
        paths=tuple(paths), orders=sim.orders, simulation=sim,
    )  # fmt: skip
    return spec_from_plan(
        run_id="skip-test", model=cfg, plan=skipping, rank_of=rank_of, hyper=hyper
    )


def test_skip_and_swap_paths_give_each_stage_its_visitors_gradient(
    harness: TrainHarness, tmp_path: Path
) -> None:
    path = save_tiny(tmp_path / "four", layers=4, tied=False)
    with Checkpoint(path) as ckpt:
        cfg = ckpt.model_config
    lr = 5.0  # one plain SGD step: large enough that every tensor visibly moves
    hyper = Hyper(lr=lr, optimizer="sgd", micro_batch_size=MICRO, seq_len=SEQ, num_micro_batches=3)
    ranked = harness.members(["ta", "tb", "tc", "td"])
    spec = _skip_spec(cfg, {m.name: r for r, m in enumerate(ranked, 1)}, hyper)
    data = batches(cfg, 3, MICRO, SEQ, seed=9)
    session = TrainingSession(harness.links, spec, ranked)
    try:
        session.initialize(step=0, baseline=Baseline(kind="weights", path=path), cfg=cfg)
        before = _params(session, cfg)
        session.iterate(0, lambda mb: data[mb])
        after = _params(session, cfg)
    finally:
        session.close(stop=True)

    model = FullModel(cfg)
    load_stage_weights(model, read_hf_weights(path, list(model.hf_names().values())))
    layers_of = {1: [0], 2: [1], 3: [2, 3]}
    for mb, hops in enumerate(spec.paths):
        order = [layer for stage, _ in hops[1:-1] for layer in layers_of[stage]]
        model.loss_sum(data[mb][:, :-1], data[mb][:, 1:], keep_layers=order).backward()
    stage_of_layer = {0: 1, 1: 2, 2: 3, 3: 3}
    grads = {
        hf: p.grad for hf, p in zip(model.hf_names().values(), model.parameters(), strict=True)
    }
    for name, grad in grads.items():
        stage = stage_of_layer[int(name.split(".")[2])] if ".layers." in name else 0
        want = before[name] - lr * (grad if grad is not None else 0.0) / (
            MICRO * SEQ * spec.visits(stage)
        )
        err = float((after[name] - want).abs().max() / before[name].abs().max())
        assert err <= 1e-5, f"{name} (stage {stage}): SGD step off by {err:.2e} (relative)"
        moved = float((after[name] - before[name]).abs().max() / before[name].abs().max())
        assert moved > 1e-3, f"{name}: the step is too small for the check to mean anything"
    assert spec.visits(1) == spec.visits(2) == spec.visits(3) == 2
