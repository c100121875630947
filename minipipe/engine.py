"""Runs the GPipe fill-drain schedule of one stage, action by action, exactly as schedule.py lists it.

    F0 F1 ... F(M-1) | B(M-1) ... B0 | all-reduce over dp -> clip by the global norm -> step

Gradient contract: the loss of a step is the mean over every counted unit (token or sample) of
the global mini-batch. Micro-batch m contributes loss_sum(m) / units(global batch), so the
gradients accumulated over micro-batches and summed over dp replicas equal the full-batch
gradient, uneven micro-batches and ignored tokens included.
"""
import math
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from minipipe import microbatch as mb
from minipipe.comm import StageComm
from minipipe.errors import PipelineError
from minipipe.recompute import grad_leaf, recompute_forward, recomputes
from minipipe.schedule import Action, forward_actions, gpipe_actions
from minipipe.tied import TiedEmbedding
from models.batchnorm import PipelineBatchNorm2d, commit_deferred_stats

LOSS_SCALE_GROWTH_INTERVAL = 2000  # float16: double the loss scale after this many finite steps


def _grad_spec(value):
    """Shape and dtype of the gradient expected back for a sent value: its floating entries,
    with the same structure (Tensor or tuple), as meta tensors that hold no memory."""
    def meta(t):
        return torch.empty(t.shape, dtype=t.dtype, device="meta")
    if isinstance(value, torch.Tensor):
        return meta(value)
    return tuple(meta(t) for t in value if t.is_floating_point())


def _input_grads(leaf):
    """The gradient a stage sends back: one per floating input entry, structured like the input."""
    def grad(t):
        return t.grad if t.grad is not None else torch.zeros_like(t)
    if isinstance(leaf, torch.Tensor):
        return grad(leaf)
    return tuple(grad(t) for t in leaf if t.is_floating_point())


class Engine:
    def __init__(self, stage, layout, loss_sum, count_units, optimizer, n_microbatches: int,
                 recompute: str = "always", timeout_s: float = 300.0, autocast_dtype=None,
                 deferred_bn: bool = False, layer_param_counts: list[int] | None = None,
                 input_dtype=None):
        self.stage, self.layout, self.optimizer = stage, layout, optimizer
        self.loss_sum, self.count_units = loss_sum, count_units
        self.n_microbatches, self.recompute, self.deferred_bn = n_microbatches, recompute, deferred_bn
        # Slot of each of this stage's parameters in the whole model's parameter order
        # (layer_param_counts: parameter tensors per global layer; default: this stage is the model).
        counts = layer_param_counts or [len(list(layer.parameters())) for layer in stage.layers.values()]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        self.n_param_slots = sum(counts)
        self.tied = TiedEmbedding(stage, layout, timeout_s)  # issue 12: a tied head's copy has no slot
        counted = [(starts[i] + j, p) for i, layer in zip(stage.indices, stage.layers.values())
                   for j, p in enumerate(self.tied.counted(i, layer)) if p.requires_grad]
        self.norm_params = [p for _, p in counted]  # issue 12: what the global gradient norm counts
        self.param_slots = torch.tensor([slot for slot, _ in counted], dtype=torch.long, device=layout.device)
        self.first, self.last = layout.is_first, layout.is_last
        self.device = layout.device
        self.autocast_dtype, self.input_dtype = autocast_dtype, input_dtype
        # Dynamic loss scaling for float16 autocast, whose small gradients would underflow.
        self.loss_scale = 2.0 ** 16 if autocast_dtype == torch.float16 else 1.0
        self.steps_at_scale = 0
        self.comm = StageComm(layout.rank, layout.prev_rank, layout.next_rank, layout.stage,
                              layout.device, timeout_s) if layout.n_stages > 1 else None
        self.actions = gpipe_actions(layout.stage, layout.n_stages, n_microbatches)
        self.executed: list[Action] = []  # what the last train_step ran, for the schedule test
        self.spans: list[tuple] = []  # (kind, microbatch, start_s, end_s) of the last step
        # Set by the caller for measured steps on CUDA: wait for the device before closing a span,
        # so spans are device time. Off otherwise: no sync per micro-batch.
        self.sync_spans = False
        self.sync_point = 0.0  # when this rank left the last step's grad-norm all-reduce
        self.has_batchnorm = any(isinstance(m, PipelineBatchNorm2d) for m in stage.modules())

    # ---- one training step ------------------------------------------------------------------
    def train_step(self, inputs, targets, step: int, lr: float, grad_clip: float) -> dict:
        """Forward and backward of every micro-batch, then the synchronous update.
        Returns {"loss", "grad_norm"}, the same on every rank."""
        self.stage.train()
        self._begin(inputs, targets, step)
        handlers = {"recv_act": self._recv_act, "forward": self._forward, "send_act": self._send_act,
                    "recv_grad": self._recv_grad, "backward": self._backward,
                    "send_grad": self._send_grad, "allreduce": self._allreduce,
                    "step": lambda _: self._optimizer_step(lr, grad_clip)}
        self._run(self.actions, handlers)
        return self.result

    def _run(self, actions, handlers):
        """Execute the schedule verbatim, recording what ran and when."""
        self.executed, self.spans = [], []
        for action in actions:
            start = time.perf_counter()
            handlers[action.kind](action.microbatch)
            self.spans.append((action.kind, action.microbatch, start, self._now()))
            self.executed.append(action)

    def _now(self) -> float:
        if self.sync_spans:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ---- forward-only: evaluation and generation ---------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches) -> float:
        """Mean loss over `batches` (an iterable of global (inputs, targets)), on every rank."""
        self.stage.eval()
        lay = self.layout
        actions = forward_actions(lay.stage, lay.n_stages, self.n_microbatches)
        handlers = {"recv_act": self._recv_act, "forward": self._eval_forward, "send_act": self._send_act}
        loss_sum, units = 0.0, 0
        for inputs, targets in batches:
            self._begin(inputs, targets, step=0)
            self._run(actions, handlers)
            loss_sum, units = loss_sum + self.loss_total * self.units, units + self.units
        if self.comm is not None:
            self.comm.wait_sends()
        total = torch.tensor([loss_sum], dtype=torch.float64, device=self.device)
        if lay.world_size > 1:
            dist.all_reduce(total)
        return float(total) / units

    def _eval_forward(self, m):
        output = self._run_stage(self._stage_input(m), m)
        if self.last:
            self.loss_total += float(self._loss(output, m))
        else:
            self.outbox[m] = output

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n_new: int, max_context: int, temperature: float = 0.8,
                 top_k: int = 40, seed: int = 0) -> torch.Tensor:
        """Autoregressive sampling through the pipeline (Transformer). prompt: (1, T) ids.
        The last stage samples each token and broadcasts it to the stages of its pipeline."""
        self.stage.eval()
        lay = self.layout
        tokens = prompt.to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        last_rank = lay.rank + lay.n_stages - 1 - lay.stage
        for _ in range(n_new):
            context = tokens[:, -max_context:]
            value = context if self.first else self.comm.recv(
                lay.prev_rank, microbatch=0, expect_batch=1, what="generation activation")
            output = self._run_stage(value, 0)
            if not self.last:
                self.comm.send(output, lay.next_rank, what="generation activation")
                self.comm.wait_sends()
                token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            else:
                logits = output[:, -1, :].float() / temperature
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
            if lay.n_stages > 1:
                dist.broadcast(token, src=last_rank, group=lay.pipeline_group)
            tokens = torch.cat([tokens, token], dim=1)
        return tokens[0, prompt.shape[1]:].cpu()

    def _begin(self, inputs, targets, step):
        """Every rank holds the global batch; take this replica's rows, split into micro-batches."""
        lay = self.layout
        rows = mb.batch_size(targets) // lay.dp
        own = slice(lay.dp_rank * rows, (lay.dp_rank + 1) * rows)
        self.step_index = step
        self.units = self.count_units(targets)  # of the global batch: the loss normaliser
        self.micro_inputs = mb.split(self._to_device(inputs, own), self.n_microbatches) if self.first else None
        self.micro_targets = mb.split(targets[own].to(self.device), self.n_microbatches) if self.last else None
        self.micro_sizes = [len(t) for t in torch.tensor_split(torch.empty(rows), self.n_microbatches)]
        self.inbox, self.outbox, self.sent_spec = {}, {}, {}
        self.stash, self.graphs, self.grads_out = {}, {}, {}
        self.loss_total = 0.0

    def _global_microbatch(self, m: int) -> int:
        """Micro-batch m of replica d holds the rows of micro-batch d*M + m of the global batch:
        that index keys its dropout masks, so dp=2 x M draws the masks of dp=1 x 2M."""
        return self.layout.dp_rank * self.n_microbatches + m

    def _to_device(self, value, rows):
        """This replica's rows on the stage's device; floating inputs in the parameters' dtype."""
        def move(t):
            return t[rows].to(self.device, self.input_dtype if t.is_floating_point() else None)
        return move(value) if isinstance(value, torch.Tensor) else tuple(move(t) for t in value)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _recv_act(self, m):
        prev = self.layout.prev_rank
        self.inbox[m] = self.comm.recv(prev, microbatch=m, expect_batch=self.micro_sizes[m],
                                       what=f"activation of micro-batch {m} from stage {self.layout.stage - 1}")
        if m + 1 < self.n_microbatches:  # the next activation's header may land while we compute
            self.comm.expect(prev, f"activation of micro-batch {m + 1}")

    def _stage_input(self, m):
        return self.micro_inputs[m] if self.first else self.inbox.pop(m)

    def _run_stage(self, value, m):
        try:
            with self._autocast():
                return self.stage(value, self.step_index, self._global_microbatch(m))
        except RuntimeError as err:
            if self.first or isinstance(err, torch.OutOfMemoryError):
                raise
            received = [(tuple(t.shape), str(t.dtype)) for t in mb.as_tuple(value)]
            raise PipelineError(f"rank {self.layout.rank} (stage {self.layout.stage}, micro-batch {m}): "
                                f"the stage failed on micro-batch {m} received from stage "
                                f"{self.layout.stage - 1} as {received}: {err}. If this is a shape "
                                f"or dtype error, the stages disagree on the boundary value: check "
                                f"that every rank runs the same model flags.") from err

    def _loss(self, output, m):
        with self._autocast():
            return self.loss_sum(output, self.micro_targets[m]) / self.units

    def _forward(self, m):
        value = self._stage_input(m)
        if recomputes(self.recompute, m, self.n_microbatches):
            with torch.no_grad():
                output = self._run_stage(value, m)
                if self.last:
                    self.loss_total += float(self._loss(output, m))
            self.stash[m] = value
        else:
            leaf = grad_leaf(value) if not self.first else value
            output = self._run_stage(leaf, m)
            if self.last:
                loss = self._loss(output, m)
                self.loss_total += float(loss.detach())
                output = loss
            self.graphs[m] = (leaf, output)
        if not self.last:
            self.outbox[m] = output.detach() if isinstance(output, torch.Tensor) else tuple(
                t.detach() for t in output)

    def _send_act(self, m):
        value = self.outbox.pop(m)
        self.sent_spec[m] = _grad_spec(value)
        self.comm.send(value, self.layout.next_rank, what=f"activation of micro-batch {m}")

    def _recv_grad(self, m):
        self.grads_out[m] = self.comm.recv(
            self.layout.next_rank, microbatch=m, expect_like=self.sent_spec.pop(m),
            what=f"gradient of micro-batch {m} from stage {self.layout.stage + 1}")
        if m > 0:
            self.comm.expect(self.layout.next_rank, f"gradient of micro-batch {m - 1}")

    def _backward(self, m):
        if m in self.stash:
            start = time.perf_counter()
            with self._autocast():
                leaf, output = recompute_forward(self.stage, self.stash.pop(m), self.step_index,
                                                 self._global_microbatch(m), input_grad=not self.first)
            if self.last:
                output = self._loss(output, m)
            self.spans.append(("recompute", m, start, self._now()))  # nested in backward(m)
        else:
            leaf, output = self.graphs.pop(m)
        if self.last:
            torch.autograd.backward(output * self.loss_scale)
        else:
            outs = [o for o in mb.as_tuple(output) if o.is_floating_point()]
            pairs = [(o, g) for o, g in zip(outs, mb.as_tuple(self.grads_out.pop(m))) if o.requires_grad]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if not self.first:
            self.inbox[m] = _input_grads(leaf)

    def _send_grad(self, m):
        self.comm.send(self.inbox.pop(m), self.layout.prev_rank, what=f"gradient of micro-batch {m}")

    # ---- after the drain ----------------------------------------------------------------------
    def _params(self):
        return [p for p in self.stage.parameters() if p.requires_grad]

    def _allreduce(self, _):
        """Sum gradients over the dp replicas of this stage (their losses were already divided by
        the global unit count), then settle BatchNorm running statistics."""
        if self.comm is not None:
            self.comm.wait_sends()
        lay = self.layout
        if lay.dp > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params()]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=lay.stage_group)
            for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                grad.copy_(synced)
            for p, grad in zip(self._params(), grads):
                p.grad = grad
        self.tied.sum_copies()  # issue 12: the tied embedding's two copies get their summed gradient
        if self.has_batchnorm:
            if self.deferred_bn:
                commit_deferred_stats(self.stage, lay.stage_group if lay.dp > 1 else None)
            elif lay.dp > 1:  # per-micro-batch statistics differ per replica: keep replicas equal
                for buf in self.stage.buffers():
                    dist.all_reduce(buf, group=lay.stage_group)
                    buf.div_(lay.dp)

    def _optimizer_step(self, lr: float, grad_clip: float):
        """Global gradient norm over all stages, in one collective that also carries the loss.
        Each parameter's norm travels in its own slot of one vector (its index in the whole
        model's parameter order), and every rank takes the norm of that vector: the same numbers
        as torch.nn.utils.clip_grad_norm_ on the whole model, bitwise, for any K."""
        params = self._params()
        packed = torch.zeros(self.n_param_slots + 1, dtype=torch.float64, device=self.device)
        if self.layout.dp_rank == 0:  # replicas hold equal gradients after the all-reduce: count one
            grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.norm_params]
            packed[self.param_slots] = torch.stack(torch._foreach_norm(grads)).double()
        packed[-1] = self.loss_total
        start = time.perf_counter()
        if self.layout.world_size > 1:
            dist.all_reduce(packed)
        param_norms = packed[:-1].cpu()  # the host copy waits for the collective on any device
        # Every rank leaves this all-reduce at (nearly) the same instant: the timeline's common clock.
        self.sync_point = time.perf_counter()
        self.spans.append(("norm_allreduce", None, start, self.sync_point))
        grad_norm = float(torch.linalg.vector_norm(param_norms)) / self.loss_scale
        self.result = {"loss": float(packed[-1]), "grad_norm": grad_norm, "skipped": False}
        if not math.isfinite(grad_norm):  # every rank sees the same norm, so all agree
            if self.autocast_dtype != torch.float16:
                raise FloatingPointError(
                    f"step {self.step_index}: the gradient norm is {grad_norm} (loss "
                    f"{self.result['loss']}); training diverged. Lower --lr, raise --warmup, "
                    f"keep --grad-clip on, or resume from an earlier checkpoint.")
            self.optimizer.zero_grad(set_to_none=True)  # float16 overflow: skip, lower the scale
            self.loss_scale, self.steps_at_scale = self.loss_scale / 2, 0
            self.result["skipped"] = True
            return
        factor = 1.0 / self.loss_scale  # unscale (float16) and clip in one multiply
        if grad_clip > 0:
            factor *= min(1.0, grad_clip / (grad_norm + 1e-6))  # torch's clip_grad_norm_ formula
        if factor != 1.0:
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], factor)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_at_scale += 1
        if self.loss_scale != 1.0 and self.steps_at_scale == LOSS_SCALE_GROWTH_INTERVAL:
            self.loss_scale, self.steps_at_scale = self.loss_scale * 2, 0
