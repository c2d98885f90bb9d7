"""The device agent's round loop: register, ask for work, train locally, upload the generalist delta.

One round, as the device sees it (every arrow is a durable commit of the state directory):

    task "train" (round r, generalist v)  ->  download v, install it as the generalist  -> phase "training"
    each local step (expert step + any router phase due)                                -> steps_done += 1
    validation loss, delta = generalist now - v, encoded once                          -> phase "trained"
    upload the *stored* payload (idempotency key persisted by SyncClient first)        -> phase "uploaded"
    report metrics                                                                     -> reported

Whatever instant the process dies, the next start resumes from the last commit: steps already
committed are not redone, a stored payload is uploaded byte-for-byte as before under the same
key (so the coordinator answers a re-send with its original acknowledgement and counts it once),
and an interrupted round whose window has closed is dropped cleanly (local experts keep their
training; the next round starts from the new generalist).

Only generalist tensors are ever encoded: the payload is built from `generalist_state`, which
asks `edge_runtime.roles`; specialists, routers and optimizer state stay in the state directory.
"""

from __future__ import annotations

import dataclasses
import io
import math
import platform
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.agent.state import SYNC_CLIENT_FILE, StateCorruptError, StateDir, StateMismatchError, recovery_hint

# exit codes of `comigs edge run` (documented in its --help)
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_AUTH, EXIT_STATE = 0, 1, 2, 3, 4, 5


class AgentError(Exception):
    """A condition the operator must fix; `exit_code` tells scripts which kind."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass(frozen=True)
class AgentOptions:
    """Everything `comigs edge run` takes; the coordinator's per-round config overrides the training defaults."""

    coordinator: str
    token: str
    data: Path
    state_dir: Path
    experts: str = "1,1"
    rank: int = 8
    backend: str = "eager"
    artifacts: Path | None = None
    model: str = "default"
    budget_mb: float | None = None
    base_dtype: str = "auto"
    ca_file: Path | None = None
    server_name: str | None = None
    insecure: bool = False
    device_id: str | None = None
    max_rounds: int | None = None
    # training defaults, used where the coordinator sends 0 ("device default")
    local_steps: int = 10
    batch_size: int = 8
    seq_len: int = 128
    router_every: int = 30
    router_steps: int = 10
    lr: float = 2e-3
    router_lr: float = 2e-3
    total_steps: int | None = None
    seed: int = 0
    # operation
    encoding: str = "fp32"
    eval_batches: int = 4
    save_every: int = 1
    keep_sent: int = 3
    retries: int = 6
    retry_backoff_s: float = 0.5
    threads: int | None = None
    quiet: bool = False


# -- pieces shared with `comigs edge plan` ------------------------------------------------------------

def load_device_data(directory: Path, seq_len: int, vocab_size: int) -> tuple[Any, Any]:
    """(train, valid) token splits, refused with a clear message when they hold no usable text."""
    from edge_runtime.data.tokens import DataError, load_splits

    hint = ("prepare token splits with `comigs data prepare --scenario ... --out DIR` (or `--scenario dir` for "
            "your own text files) and point --data at one device's directory holding train.npy and valid.npy")
    if not directory.is_dir():
        raise AgentError(f"data directory {directory} does not exist; {hint}.", EXIT_USAGE)
    try:
        splits = load_splits(directory, ("train", "valid"))
    except DataError as exc:
        raise AgentError(f"{directory} has no usable text: {exc} ({hint}).", EXIT_USAGE) from None
    for name, split in splits.items():
        if len(split) < seq_len + 1:
            raise AgentError(f"{directory} has no usable text: {name}.npy holds {len(split)} tokens, fewer than "
                             f"one training window of {seq_len + 1}; {hint}, or use a shorter --seq-len.", EXIT_USAGE)
        try:
            split.check_vocab(vocab_size)
        except DataError as exc:
            raise AgentError(f"{exc} Prepare the data with the tokenizer of the base model.", EXIT_USAGE) from None
    return splits["train"], splits["valid"]


def build_device_model(source: str, experts: str, rank: int, seed: int, base_dtype: str = "auto",
                       budget_mb: float | None = None) -> Any:
    """The base model with this device's CoMiGS experts injected; specialists/routers seeded by `seed`.

    `base_dtype="bf16"` halves the frozen weights (experts and routers stay fp32); "auto" picks
    fp32 unless `budget_mb` cannot hold it (budget.choose_base_dtype, decided before loading)."""
    import torch

    from edge_runtime.budget import BudgetError, choose_base_dtype
    from edge_runtime.model.config import CoMiGSConfig, ConfigError
    from edge_runtime.model.inject import inject_comigs
    from edge_runtime.model.loading import (
        ModelSourceError,
        count_base_parameters,
        is_gguf_source,
        load_base_model,
        parse_base_dtype,
    )

    try:
        config = CoMiGSConfig.parse_experts(experts, rank=rank)
        if base_dtype != "auto":
            dtype = parse_base_dtype(base_dtype)
        elif budget_mb:
            dtype = choose_base_dtype(budget_mb, count_base_parameters(source), is_gguf_source(source))
        else:
            dtype = torch.float32
        model, _ = load_base_model(source, with_tokenizer=False, dtype=dtype)
    except (ConfigError, ModelSourceError, BudgetError) as exc:
        raise AgentError(str(exc), EXIT_USAGE) from None
    torch.manual_seed(seed)
    return inject_comigs(model, config)


def executorch_manifest(artifacts: Path | None, experts: str) -> Any:
    """The verified-to-be-readable manifest of an artifact directory for the ExecuTorch backend."""
    from edge_runtime.artifacts import ArtifactError, Manifest
    from edge_runtime.model.config import CoMiGSConfig, ConfigError

    if artifacts is None:
        raise AgentError("--backend executorch needs --artifacts DIR (a `comigs export` directory with pte-train).",
                         EXIT_USAGE)
    try:
        manifest = Manifest.load(artifacts)
        manifest.artifact("pte-train")
        wanted = CoMiGSConfig.parse_experts(experts)
    except (ArtifactError, ConfigError) as exc:
        raise AgentError(str(exc), EXIT_USAGE) from None
    exported = manifest.data["comigs"]
    if (exported["n_generalists"], exported["n_specialists"]) != (wanted.n_generalists, wanted.n_specialists):
        raise AgentError(f"--experts {experts} does not match the artifacts in {artifacts}, exported with "
                         f"{exported['n_generalists']},{exported['n_specialists']}.", EXIT_USAGE)
    return manifest


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """How one round trains within the budget: micro-batch, accumulation and memory savers."""

    backend: str
    batch_size: int
    micro_batch_size: int
    seq_len: int
    loss_chunk_tokens: int | None = None
    activation_checkpointing: bool = False
    estimated_peak_bytes: int | None = None
    budget_bytes: int | None = None
    arena_bytes: int | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan_eager(model: Any, budget_mb: float | None, batch_size: int, seq_len: int) -> TrainingPlan:
    """budget.plan_memory's choice (measured probe steps), or the full micro-batch without a budget."""
    from edge_runtime.budget import BudgetError, plan_memory

    if not budget_mb:
        return TrainingPlan("eager", batch_size, batch_size, seq_len, description="no memory budget: full batch")
    try:
        plan = plan_memory(model, budget_mb, batch_size, seq_len)
    except BudgetError as exc:
        raise AgentError(str(exc), EXIT_USAGE) from None
    return TrainingPlan("eager", batch_size, plan.option.micro_batch_size, seq_len, plan.option.loss_chunk_tokens,
                        plan.option.activation_checkpointing, plan.peak_bytes, plan.budget_bytes,
                        description=plan.describe())


def plan_executorch(manifest: Any, budget_mb: float | None, batch_size: int) -> TrainingPlan:
    """The exported program fixes micro-batch and sequence length; its arena size is a hard memory figure."""
    from edge_runtime.artifacts.executorch_open import memory_requirement
    from edge_runtime.budget import MB
    from edge_runtime.memory import current_rss_bytes

    entry = manifest.artifact("pte-train")
    micro, seq_len = int(entry["batch"]), int(entry["seq_len"])
    batch = max(micro, batch_size - batch_size % micro)
    program = memory_requirement(entry)
    arena = int(entry.get("memory", {}).get("arena_bytes", 0))
    trainable = sum(math.prod(p["shape"]) for p in manifest.data["parameters"] if p["name"] in entry["trainable"])
    peak = current_rss_bytes() + program + trainable * 4 * 4  # + gradients, accumulated grads, AdamW moments
    budget = int(budget_mb * MB) if budget_mb else None
    text = (f"exported micro-batch {micro} x {seq_len} tokens, {batch // micro} accumulation step(s): estimated peak "
            f"{peak / MB:.0f} MB (activation arena {arena / MB:.1f} MB, program + weights {(program - arena) / MB:.1f} "
            f"MB, runtime resident {(peak - program - trainable * 16) / MB:.0f} MB)")
    if budget is not None and peak > budget:
        raise AgentError(f"a memory budget of {budget_mb:.0f} MB is too small for the exported training program: "
                         f"{text}. Use --budget-mb {-(-peak // MB)} or more, or re-export with a smaller "
                         "--train-batch/--train-seq-len.", EXIT_USAGE)
    return TrainingPlan("executorch", batch, micro, seq_len, estimated_peak_bytes=peak, budget_bytes=budget,
                        arena_bytes=arena, description=text)


# -- tensors <-> bytes ----------------------------------------------------------------------------------

def _tensors_bytes(tensors: Mapping[str, Any]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous() for k, v in tensors.items()})


def _tensors_from(data: bytes) -> dict[str, Any]:
    from safetensors.torch import load

    return load(data)


def _pickle_bytes(obj: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _unpickle(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


# -- the agent ----------------------------------------------------------------------------------------

class DeviceAgent:
    """One device: its backend, its durable state, its connection to the coordinator."""

    def __init__(self, options: AgentOptions, out: Callable[[str], None] | None = None) -> None:
        self.o = options
        self._out = out or (lambda text: print(text, flush=True))
        self.state = StateDir(options.state_dir)
        self.record: dict[str, Any] = {}
        self.backend: Any = None
        self.client: Any = None
        self.plan: TrainingPlan | None = None
        self.name = options.device_id or "device"

    def log(self, text: str) -> None:
        if not self.o.quiet:
            self._out(f"[{self.name}] {text}")

    # -- entry point ---------------------------------------------------------------------------
    def run(self) -> int:
        import torch

        if self.o.threads:
            torch.set_num_threads(self.o.threads)
        if self.o.encoding not in ("fp32", "fp16", "int8"):
            raise AgentError(f"--encoding must be fp32, fp16 or int8, got {self.o.encoding!r}.", EXIT_USAGE)
        self.state.lock()
        try:
            record = self.state.load()
            self._setup_backend()
            self.identity = self._identity()
            if record is not None:
                self._restore(record)
            self._connect()
            if record is None:
                self.record = {"identity": self.identity, "device_id": self.client.device_id, "completed_rounds": 0,
                               "round": None, "history": [], "plan": self.plan.to_dict() if self.plan else None}
                self._commit(tensors=True)
                self.log(f"new state directory {self.o.state_dir}")
            return self._loop()
        finally:
            if self.client is not None:
                self.client.close()
            if self.backend is not None:
                self.backend.close()
            self.state.unlock()

    # -- setup ---------------------------------------------------------------------------------
    def _setup_backend(self) -> None:
        o = self.o
        if o.backend == "executorch":
            self.manifest = executorch_manifest(o.artifacts, o.experts)
            vocab = int(self.manifest.data["base_model"]["vocab_size"])
            self.plan = plan_executorch(self.manifest, o.budget_mb, o.batch_size)
            self.model = None
        elif o.backend == "eager":
            self.manifest = None
            self.log(f"loading base model {o.model!r} with experts {o.experts} ...")
            self.model = build_device_model(o.model, o.experts, o.rank, o.seed, o.base_dtype, o.budget_mb)
            vocab = int(self.model.config.vocab_size)
            self.plan = None
        else:
            raise AgentError(f"--backend must be eager or executorch, got {o.backend!r}.", EXIT_USAGE)
        seq_len = self.plan.seq_len if self.plan else o.seq_len
        self.train_split, self.valid_split = load_device_data(o.data, seq_len, vocab)
        if o.backend == "eager":
            self.plan = plan_eager(self.model, o.budget_mb, o.batch_size, seq_len)
        self.log(f"memory plan: {self.plan.description}")
        config = self._trainer_config({})
        try:
            if o.backend == "eager":
                from edge_runtime.agent.backends import EagerBackend

                self.backend = EagerBackend(self.model, config, self.train_split, self.valid_split)
            else:
                from edge_runtime.agent.backends import ExecuTorchBackend

                budget = int(o.budget_mb * (1 << 20)) if o.budget_mb else None
                self.backend = ExecuTorchBackend(o.artifacts, config, self.train_split, self.valid_split,
                                                 memory_budget_bytes=budget)
        except Exception as exc:  # artifacts integrity / budget / layout: the operator must act
            from edge_runtime.agent.backends import BackendError
            from edge_runtime.artifacts import ArtifactError

            if isinstance(exc, ArtifactError | BackendError):
                raise AgentError(f"cannot use the artifacts in {o.artifacts}: {exc}", EXIT_USAGE) from None
            raise

    def _trainer_config(self, local: Mapping[str, Any]) -> Any:
        """TrainerConfig for a round: the coordinator's values where it sets them, ours otherwise."""
        from edge_runtime.training.trainer import TrainerConfig

        o, plan = self.o, self.plan
        assert plan is not None
        batch = int(local.get("batch_size") or o.batch_size)
        micro = plan.micro_batch_size if plan.batch_size == batch else None
        if micro is None or batch % micro:  # the coordinator changed the batch size: keep the planned micro-batch
            micro = min(plan.micro_batch_size, batch)
            while batch % micro:
                micro -= 1
        if o.backend == "executorch":
            if batch % plan.micro_batch_size:
                batch = max(plan.micro_batch_size, batch - batch % plan.micro_batch_size)
            micro = plan.micro_batch_size
        lr = float(local.get("expert_lr") or o.lr)
        steps = int(local.get("local_steps") or o.local_steps)
        extra = local.get("extra") or {}
        total = int(extra.get("total_steps", 0) or o.total_steps or steps * (o.max_rounds or 20))
        return TrainerConfig(batch_size=batch, micro_batch_size=micro, seq_len=plan.seq_len, lr=lr, min_lr=lr / 10,
                             router_lr=float(local.get("router_lr") or o.router_lr),
                             router_every=int(local.get("router_every") or o.router_every),
                             router_steps=int(local.get("router_steps") or o.router_steps),
                             total_steps=total, seed=o.seed, activation_checkpointing=plan.activation_checkpointing,
                             loss_chunk_tokens=plan.loss_chunk_tokens, release_memory=bool(o.budget_mb))

    def _identity(self) -> dict[str, Any]:
        g, s = (int(x) for x in self.o.experts.split(","))
        if self.model is not None:
            cfg = self.model.config
            base = {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size,
                    "hidden_size": getattr(cfg, "hidden_size", getattr(cfg, "n_embd", None)),
                    "num_layers": getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None))}
        else:
            b = self.manifest.data["base_model"]
            base = {k: b.get(k) for k in ("model_type", "vocab_size", "hidden_size", "num_layers")}
        return {"backend": self.o.backend, "n_generalists": g, "n_specialists": s, "rank": self.o.rank,
                "base_model": base}

    def _restore(self, record: dict[str, Any]) -> None:
        from edge_runtime import roles

        if record.get("identity") != self.identity:
            raise StateMismatchError(
                f"{self.o.state_dir} belongs to a device set up as {record.get('identity')}, but this run is "
                f"{self.identity}. Run with the same --backend/--experts/--rank/--model, or use another --state-dir.")
        try:
            self.backend.load_trainable(_tensors_from(self.state.read_blob("tensors")), *roles.TRAINABLE_ROLES)
            self.backend.load_state_dict(_unpickle(self.state.read_blob("trainer")))
        except StateCorruptError:
            raise
        except Exception as exc:  # hashes matched but the content does not load: written by something else
            raise StateCorruptError(f"the agent state in {self.o.state_dir} cannot be loaded ({exc}). "
                                    f"{recovery_hint(self.o.state_dir)}") from None
        self.record = record
        r = record.get("round") or {}
        self.log(f"resumed from {self.o.state_dir}: {record['completed_rounds']} round(s) completed, "
                 f"{self.backend.step} local step(s)"
                 + (f", round {r['id']} {r['phase']} ({r['steps_done']}/{r['local_steps']} steps)" if r else ""))

    def _connect(self) -> None:
        from edge_runtime.sync_client import Capabilities, RetryPolicy, SyncClient

        o = self.o
        try:
            self.client = SyncClient(
                o.coordinator, o.token, device_id=o.device_id, ca_file=o.ca_file, server_name=o.server_name,
                insecure=o.insecure, state_path=o.state_dir / SYNC_CLIENT_FILE,
                retry=RetryPolicy(max_attempts=max(1, o.retries), initial_backoff_s=o.retry_backoff_s,
                                  max_backoff_s=max(o.retry_backoff_s, 30.0)))
        except ValueError as exc:
            if "sync client state" in str(exc):
                raise StateCorruptError(f"{exc}. {recovery_hint(o.state_dir)}") from None
            raise AgentError(str(exc), EXIT_USAGE) from None
        except OSError as exc:
            raise AgentError(f"cannot read --ca-file: {exc}", EXIT_USAGE) from None
        g, s = self.identity["n_generalists"], self.identity["n_specialists"]
        caps = Capabilities(num_experts=g + s, num_generalists=g, lora_rank=o.rank,
                            memory_budget_bytes=int((o.budget_mb or 0) * (1 << 20)),
                            runtime="torch-eager" if o.backend == "eager" else "executorch",
                            runtime_version=_runtime_version(o.backend), platform=platform.platform())
        manifest = self._sync("register with", lambda: self.client.register(caps))
        self.name = self.client.device_id or self.name
        self._check_manifest(manifest)
        self.log(f"registered with {o.coordinator} as {self.client.device_id!r} "
                 f"({g}G{s}S, backend {o.backend})")

    def _check_manifest(self, manifest: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
        ours = {n: tuple(t.shape) for n, t in self.backend.generalist_state().items()}
        theirs = {n: tuple(shape) for n, (shape, _) in manifest.items()}
        if ours != theirs:
            missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
            wrong = sorted(n for n in set(ours) & set(theirs) if ours[n] != theirs[n])
            raise AgentError(
                "the coordinator's generalist does not fit this device's model "
                f"({len(missing)} tensor(s) only at the coordinator, {len(extra)} only here, {len(wrong)} of another "
                f"shape; first: {(missing + extra + wrong)[0]!r}). Every device must use the base model, "
                "n_generalists and rank the coordinator was initialised with.", EXIT_USAGE)

    # -- coordinator calls with clear failures ---------------------------------------------------
    def _sync(self, what: str, call: Callable[[], Any]) -> Any:
        import grpc

        from edge_runtime.sync_client import SyncError

        try:
            return call()
        except SyncError as exc:
            code = exc.code
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise AgentError(
                    f"cannot reach the coordinator at {self.o.coordinator} to {what} it after {exc.attempts} "
                    f"attempt(s) ({code.name}: {exc.details}). Check the address, that `comigs sync serve` is "
                    "running there and, with TLS, --ca-file/--server-name. The device state is intact: run the "
                    "same command again to resume.", EXIT_UNREACHABLE) from None
            if code is grpc.StatusCode.PERMISSION_DENIED:
                raise AgentError(
                    f"the coordinator refused this device ({exc.details}): its token was revoked. Ask the "
                    "operator for a new one (`comigs sync add-device NAME --rotate`); the local state in "
                    f"{self.o.state_dir} is kept and resumes with the new token.", EXIT_AUTH) from None
            if code is grpc.StatusCode.UNAUTHENTICATED:
                raise AgentError(
                    f"the coordinator did not accept the token ({exc.details}). Use the token printed by "
                    "`comigs sync add-device NAME` for this device.", EXIT_AUTH) from None
            raise

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> int:
        while True:
            r = self.record.get("round")
            if r and r["phase"] == "trained":
                self._upload(r)
                continue
            if r and r["phase"] == "uploaded" and not r.get("reported"):
                self._report(r)
                continue
            if self.o.max_rounds and self.record["completed_rounds"] >= self.o.max_rounds:
                self.log(f"done: {self.record['completed_rounds']} round(s) completed (--max-rounds)")
                return EXIT_OK
            task = self._next_task(r)
            if task.action == "done":
                self.log(f"the coordinator says training is done; {self.record['completed_rounds']} round(s) "
                         "completed by this device")
                return EXIT_OK
            if not (r and r["phase"] == "training" and r["id"] == task.round_id
                    and r["base_version"] == task.generalist_version):
                if r and r["phase"] == "training":
                    self.log(f"round {r['id']} closed while this device was away; its partial generalist update is "
                             "dropped (specialists and routers keep their training)")
                r = self._start_round(task)
            self._train(r)

    def _next_task(self, r: Mapping[str, Any] | None) -> Any:
        waiting = False
        while True:
            task = self._sync("ask", self.client.get_task)
            if task.action == "done":
                return task
            finished = r and r["id"] == task.round_id and r["phase"] in ("uploaded", "abandoned")
            if task.action == "train" and not task.already_uploaded and not finished:
                return task
            if not waiting:
                self.log(f"waiting for the next round ({task.message or task.round_state or 'no open round'})")
                waiting = True
            self.client.idle(min(max(task.retry_after_s, 0.05), 10.0))

    def _start_round(self, task: Any) -> dict[str, Any]:
        import torch

        from edge_runtime import roles

        self.backend.reconfigure(self._trainer_config(task.local_config))
        self.log(f"round {task.round_id}: downloading generalist v{task.generalist_version}")
        generalist = self._sync("download the generalist from",
                                lambda: self.client.download_generalist(task.generalist_version))
        tensors = {name: torch.from_numpy(np.array(a, dtype=np.float32)) for name, a in generalist.tensors.items()}
        self._check_manifest({n: (tuple(t.shape), "float32") for n, t in tensors.items()})
        self.backend.load_trainable(tensors, roles.Role.GENERALIST)
        r = {"id": task.round_id, "base_version": task.generalist_version, "phase": "training", "steps_done": 0,
             "local_steps": int(task.local_config.get("local_steps") or self.o.local_steps),
             "local_config": dict(task.local_config),
             "loss_sum": 0.0, "step_seconds": 0.0, "router_steps": 0, "started": time.time()}
        self.record["round"] = r
        self._commit(tensors=True, blobs={"base": _tensors_bytes(tensors), "pending": None})
        return r

    def _train(self, r: dict[str, Any]) -> None:
        from edge_runtime.memory import peak_rss_bytes, reset_peak_rss

        self.backend.reconfigure(self._trainer_config(r["local_config"]))
        # Nothing to exchange until the delta is ready (minutes): hang up, so that a fleet in training
        # costs the coordinator no connection state; the upload reconnects (one TLS handshake).
        self.client.close()
        try:
            reset_peak_rss()
        except OSError:
            pass
        since_save = 0
        while r["steps_done"] < r["local_steps"]:
            metrics = self.backend.run_step()
            expert = metrics[0]
            r["steps_done"] += 1
            r["loss_sum"] += expert.loss
            r["step_seconds"] += sum(m.seconds for m in metrics)
            r["router_steps"] += len(metrics) - 1
            since_save += 1
            self.log(f"round {r['id']}: step {r['steps_done']}/{r['local_steps']} loss {expert.loss:.4f}"
                     + (f" (+{len(metrics) - 1} router steps)" if len(metrics) > 1 else ""))
            if since_save >= self.o.save_every or r["steps_done"] == r["local_steps"]:
                self._commit(tensors=True)
                since_save = 0
        valid = self.backend.validation_loss(self.valid_split, self.o.eval_batches)
        peak = peak_rss_bytes()
        base = _tensors_from(self.state.read_blob("base"))
        now = self.backend.generalist_state()
        delta = {name: (now[name].float() - base[name].float()).numpy() for name in sorted(now)}
        from sync_service import encoding as wire

        payload = wire.encode(delta, self.o.encoding)
        r.update(phase="trained", valid_loss=valid, peak_rss_bytes=peak, num_samples=len(self.train_split),
                 payload_bytes=len(payload), train_loss=r["loss_sum"] / max(r["steps_done"], 1))
        if self.o.budget_mb and peak > self.o.budget_mb * (1 << 20):
            self.log(f"warning: peak RSS {peak / 2**20:.0f} MB exceeded the budget of {self.o.budget_mb:.0f} MB")
        self._commit(blobs={"pending": payload})

    def _upload(self, r: dict[str, Any]) -> None:
        import grpc

        from edge_runtime.sync_client import SyncError

        payload = self.state.read_blob("pending")
        self.log(f"round {r['id']}: uploading the generalist delta ({len(payload) / 1e6:.2f} MB {self.o.encoding}, "
                 f"{r['num_samples']} samples)")
        try:
            result = self._sync("upload to", lambda: self.client.upload_encoded(
                r["id"], r["base_version"], payload, r["num_samples"], encoding=self.o.encoding))
        except SyncError as exc:
            if exc.code is grpc.StatusCode.FAILED_PRECONDITION:  # round closed or moved on: too late
                self.log(f"round {r['id']}: the coordinator no longer accepts this delta ({exc.details}); "
                         "dropping it and waiting for the next round")
                r.update(phase="abandoned", reported=True)
                self._history(r, "late")
                self._commit(blobs={"pending": None})
                return
            if exc.code is grpc.StatusCode.ALREADY_EXISTS:  # counted before under a lost key
                self.log(f"round {r['id']}: the coordinator already holds this device's upload ({exc.details})")
                result = None
            else:
                raise
        sent = self.state.write_sent_copy(r["id"], payload, self.o.keep_sent)
        r.update(phase="uploaded", reported=False, duplicate=bool(result and result.duplicate),
                 upload_id=result.upload_id if result else None, sent_file=str(sent) if sent else None)
        self.record["completed_rounds"] += 1
        self._history(r, "uploaded")
        self._commit(blobs={"pending": None})
        if result is not None:
            self.log(f"round {r['id']}: upload acknowledged"
                     + (" (a re-send: counted once)" if result.duplicate else "")
                     + f", {result.round_uploads} upload(s) in the round")

    def _report(self, r: dict[str, Any]) -> None:
        valid = r.get("valid_loss")
        ppl = math.exp(valid) if valid is not None and math.isfinite(valid) and valid < 50 else None
        steps = max(r["steps_done"], 1)
        self._sync("report metrics to", lambda: self.client.report_metrics(
            r["id"], train_loss=r.get("train_loss"), valid_loss=valid if valid is not None and math.isfinite(valid)
            else None, perplexity=ppl, step_time_s=r["step_seconds"] / steps,
            peak_memory_bytes=int(r.get("peak_rss_bytes") or 0), local_steps=r["steps_done"],
            extra={"router_steps": float(r["router_steps"]), "budget_mb": float(self.o.budget_mb or 0)}))
        r["reported"] = True
        peak_mb = int(r.get("peak_rss_bytes") or 0) / 2**20
        self.log(f"round {r['id']}: train loss {r.get('train_loss', math.nan):.4f}, valid loss {valid:.4f}"
                 + (f" (ppl {ppl:.2f})" if ppl else "")
                 + f", {r['step_seconds'] / steps:.3f} s/step, peak RSS {peak_mb:.0f} MB")
        self._commit()

    # -- persistence ---------------------------------------------------------------------------
    def _history(self, r: Mapping[str, Any], outcome: str) -> None:
        keep = ("id", "base_version", "steps_done", "train_loss", "valid_loss", "num_samples", "peak_rss_bytes",
                "payload_bytes", "step_seconds", "upload_id", "duplicate", "sent_file")
        entry = {k: r.get(k) for k in keep} | {"outcome": outcome, "finished": time.time()}
        self.record["history"] = (self.record.get("history", []) + [entry])[-200:]

    def _commit(self, tensors: bool = False, blobs: Mapping[str, bytes | None] | None = None) -> None:
        all_blobs: dict[str, bytes | None] = dict(blobs or {})
        if tensors:
            all_blobs["tensors"] = _tensors_bytes(self.backend.trainable_state())
            all_blobs["trainer"] = _pickle_bytes(self.backend.state_dict())
        self.state.commit(self.record, all_blobs)


def _runtime_version(backend: str) -> str:
    try:
        if backend == "executorch":
            from importlib.metadata import version

            return f"executorch {version('executorch')}"
        import torch

        return f"torch {torch.__version__}"
    except Exception:  # noqa: BLE001 - informational only
        return ""


def run_agent(options: AgentOptions, out: Callable[[str], None] | None = None) -> int:
    """Run the agent; operator errors become one clear line on stderr and a documented exit code."""
    from edge_runtime.agent.state import StateError

    try:
        return DeviceAgent(options, out).run()
    except AgentError as exc:
        print(f"comigs edge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except StateError as exc:
        print(f"comigs edge: error: {exc}", file=sys.stderr)
        return EXIT_STATE
