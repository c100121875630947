"""Runs one rank's action list of a schedule (minipipe.schedule.actions), verbatim, and logs what it ran.

    train_step:  the schedule's forwards and backwards of every (chunk, micro-batch)
                 | all-reduce over dp | global grad norm + loss in one all-reduce | optim.update

Gradient contract: the loss of a step is the mean over every counted unit (token or sample) of
the global mini-batch. Micro-batch m contributes loss_sum(m) / units(global batch), so the
gradients accumulated over micro-batches and summed over dp replicas equal the full-batch
gradient, uneven micro-batches and ignored tokens included. The order of the schedule changes
which micro-batch is accumulated when, never what: every schedule computes the same gradients.

Chunks: rank r runs its local chunk v (Action.chunk) as the v-th of the model chunks the placement
gives it (spec.placement: chunk c mod K, or the V of the zero-bubble schedules). The model's first
chunk reads the batch, the last one computes the loss. A value passed between two chunks of the
same rank is handed over in memory; every other one is a message to or from the neighbouring
chunk's rank.
Dropout masks are keyed by (seed, step, layer, global micro-batch) in `Stage`, so every
schedule, recompute mode and chunking draws the same masks.
"""
from collections import Counter
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist

from minipipe.errors import PipelineError
from minipipe.pipeline import optim, running_stats, values
from minipipe.pipeline.collectives import collective
from minipipe.pipeline.comm import ACTIVATION, GRADIENT, StageComm
from minipipe.pipeline.evaluation import evaluate
from minipipe.pipeline.generation import generate
from minipipe.pipeline.recompute import grad_leaf, recompute_forward, recomputes
from minipipe.pipeline.spans import SpanRecorder
from minipipe.pipeline.spec import PipelineSpec
from minipipe.pipeline.split_backward import backward_input, backward_weight
from minipipe.pipeline.step_state import StepState
from minipipe.pipeline.tied import TiedEmbedding
from minipipe.schedule.actions import Action, Kind, message_peer


def _named_chunk(action: Action) -> int | None:
    """The chunk a span names: the rank's chunk under interleaving, None when it holds one."""
    return action.chunk if action.rank_chunks > 1 else None


BUCKET_BYTES = 25 * 2**20  # data-parallel gradient bucket (DDP's default size)


class Engine:
    """One rank's runner of the schedule. What evaluation and generation use is public: `stage`,
    `layout`, `spec`, `device`, `comm`, `rank_of` (a stage's rank in this replica), `state`,
    `last_chunk`, and the steps of a forward: `begin`, `run`, `recv_act`, `chunk_input`,
    `run_chunk`, `loss`, `send_act`, `model_chunk`, `autocast`."""

    def __init__(self, stage, layout, *, spec: PipelineSpec, loss_sum, count_units, optimizer,
                 layer_param_counts: list[int] | None = None, tied_weight=None):
        self.stage, self.layout, self.spec, self.optimizer = stage, layout, spec, optimizer
        self.loss_sum, self.count_units = loss_sum, count_units
        # Slot of each of this stage's parameters in the whole model's parameter order
        # (layer_param_counts: parameter tensors per global layer; default: this stage is the model).
        counts = layer_param_counts or [len(list(layer.parameters())) for layer in stage.layers.values()]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        self.n_param_slots = sum(counts)
        # tied_weight: the model family's TiedWeight (or None); its copy has no slot
        self.tied = TiedEmbedding(stage, layout, tied_weight, spec)
        counted = [(starts[i] + j, p) for i, layer in zip(stage.indices, stage.layers.values())
                   for j, p in enumerate(self.tied.counted(i, layer)) if p.requires_grad]
        self.norm_params = [p for _, p in counted]  # what the global gradient norm counts
        self.param_slots = torch.tensor([slot for slot, _ in counted], dtype=torch.long, device=layout.device)
        self.device = layout.device
        fp16 = spec.autocast_dtype == torch.float16
        self.scale = optim.LossScale(2.0 ** 16, 0, True) if fp16 else optim.LossScale()
        k, lay = layout.n_stages, layout
        self.last_chunk = spec.n_chunks - 1
        self.own_chunks = spec.chunks_on(lay.stage)  # the model chunk of each local chunk
        self.comm = StageComm(lay.rank, lay.prev_rank, lay.next_rank, lay.stage, lay.device,
                              spec.timeout_s, lay.p2p) if k > 1 else None
        self.actions = list(spec.actions[lay.stage])
        self.executed: list[Action] = []  # what the last train_step ran, for the schedule test
        self.clock = SpanRecorder(layout.device)  # when each action ran (minipipe/pipeline/spans.py)
        self.timed = False  # set by the caller: record device-time spans of this step on CUDA
        self.stats_layers = running_stats.stats_layers(stage)  # BatchNorm: running statistics
        self.state: StepState | None = None

    # ---- one training step ------------------------------------------------------------------
    def train_step(self, inputs, targets, step: int, lr: float, grad_clip: float) -> dict:
        """Forward and backward of every micro-batch, then the synchronous update.
        Returns {"loss", "grad_norm", "skipped"}, the same on every rank."""
        self.stage.train()
        self.begin(inputs, targets, step)
        handlers = {Kind.RECV_ACT: self.recv_act, Kind.FORWARD: self._forward, Kind.SEND_ACT: self.send_act,
                    Kind.RECV_GRAD: self._recv_grad, Kind.BACKWARD: self._backward,
                    Kind.BACKWARD_INPUT: self._backward_input, Kind.BACKWARD_WEIGHT: self._backward_weight,
                    Kind.SEND_GRAD: self._send_grad, Kind.ALLREDUCE: self._allreduce,
                    Kind.STEP: lambda _: self._update(lr, grad_clip)}
        self.run(self.actions, handlers)
        return self.result

    def run(self, actions, handlers):
        """Execute the schedule verbatim, recording what ran and when. Before each receive's
        wait, the header of the next message on its channel is posted, if one will come."""
        self.executed = []
        self.clock.begin_step(self.timed)
        # receives still to come per channel (kind, peer stage): under the V a stage receives
        # activations from both neighbours, and a header is posted early only where one will come
        self.recvs_left = Counter((a.kind, self._peer(a)) for a in actions
                                  if a.kind in (Kind.RECV_ACT, Kind.RECV_GRAD))
        for action in actions:
            start = self.clock.mark()
            handlers[action.kind](action)
            self.clock.add(action.kind.value, action.microbatch, _named_chunk(action), start, self.clock.mark())
            self.executed.append(action)

    @property
    def spans(self) -> list[tuple]:
        """(kind, micro-batch, chunk, start s, end s) of the last step's actions, host clock."""
        return self.clock.spans()

    @property
    def sync_point(self) -> float:
        """Host time when this rank left the last step's grad-norm all-reduce."""
        return self.clock.sync_point

    def begin(self, inputs, targets, step):
        """Every rank holds the global batch; take this replica's rows, split into micro-batches."""
        lay = self.layout
        rows = values.batch_size(targets) // lay.dp
        own = slice(lay.dp_rank * rows, (lay.dp_rank + 1) * rows)
        self.step_index = step
        first, last = lay.stage == self.spec.placement[0], lay.stage == self.spec.placement[-1]
        self.state = StepState(
            units=self.count_units(targets),
            batch_inputs=values.split(self._to_device(inputs, own), self.spec.n_microbatches) if first else None,
            targets=values.split(self._to_device(targets, own, cast=False), self.spec.n_microbatches) if last else None,
            sizes=[len(t) for t in torch.tensor_split(torch.empty(rows), self.spec.n_microbatches)])

    def model_chunk(self, action) -> int:
        """The model's chunk that an action of this rank runs (its own chunk `action.chunk`)."""
        return self.own_chunks[action.chunk]

    def rank_of(self, stage: int) -> int:
        """The global rank of `stage` in this rank's pipeline replica."""
        return self.layout.rank - self.layout.stage + stage

    def _local(self, chunk: int) -> bool:
        """Model chunk `chunk` runs on this rank: a value for it is handed over in memory."""
        return self.spec.placement[chunk] == self.layout.stage

    def _global_microbatch(self, m: int) -> int:
        """Micro-batch m of replica d holds the rows of micro-batch d*M + m of the global batch:
        that index keys its dropout masks, so dp=2 x M draws the masks of dp=1 x 2M."""
        return self.layout.dp_rank * self.spec.n_microbatches + m

    def _to_device(self, value, rows, cast: bool = True):
        """This replica's rows on the stage's device (floating inputs in the parameters' dtype with
        `cast`). To a GPU through pinned memory, without waiting: a pageable copy would wait for
        the device to finish the previous step's work."""
        def move(t):
            t, dtype = t[rows], self.spec.param_dtype if cast and t.is_floating_point() else None
            if self.device.type != "cuda":
                return t.to(self.device, dtype)
            return t.pin_memory().to(self.device, dtype, non_blocking=True)
        return values.map_tensors(move, value)

    def autocast(self):
        if self.spec.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.spec.autocast_dtype)

    # ---- the forward half ---------------------------------------------------------------------
    def _receive(self, action, kind, src, tag, what, **expect):
        value = self.comm.recv(src, microbatch=action.microbatch, what=what, tag=tag, **expect)
        channel = (kind, self._peer(action))
        self.recvs_left[channel] -= 1
        if self.recvs_left[channel]:  # the next header on this channel may land while we compute
            self.comm.expect(src, f"the next {'activation' if tag == ACTIVATION else 'gradient'}", tag)
        return value

    def _about(self, what, action, peer_stage):
        """`activation of micro-batch 3 from stage 0` (+ ` for chunk 2` when V > 1)."""
        text = f"{what} of micro-batch {action.microbatch} from stage {peer_stage}"
        return text if action.rank_chunks == 1 else f"{text} for chunk {self.model_chunk(action)}"

    def _peer(self, action) -> int:
        """The stage at the other end of this receive or send (the neighbouring chunk's)."""
        return message_peer(self.spec.placement, self.layout.stage, action)

    def recv_act(self, action):
        peer = self._peer(action)
        self.state.act_from_prev[action.chunk, action.microbatch] = self._receive(
            action, Kind.RECV_ACT, self.rank_of(peer), ACTIVATION, self._about("activation", action, peer),
            expect_batch=self.state.sizes[action.microbatch])

    def chunk_input(self, action):
        if self.model_chunk(action) == 0:
            return self.state.batch_inputs[action.microbatch]
        return self.state.act_from_prev.pop((action.chunk, action.microbatch))

    def run_chunk(self, value, action):
        m = action.microbatch
        try:
            with self.autocast():
                return self.stage(value, self.step_index, self._global_microbatch(m), action.chunk)
        except RuntimeError as err:
            c = self.model_chunk(action)
            if c == 0 or self._local(c - 1) or isinstance(err, torch.OutOfMemoryError):
                raise
            lay = self.layout
            received = [(tuple(t.shape), str(t.dtype)) for t in values.as_tuple(value)]
            raise PipelineError(f"rank {lay.rank} (stage {lay.stage}, micro-batch {m}): the stage "
                                f"failed on micro-batch {m} received from stage "
                                f"{self.spec.placement[c - 1]} as {received}: {err}. If this is a "
                                f"shape or dtype error, the stages disagree on the boundary value: "
                                f"check that every rank runs the same model flags.") from err

    def loss(self, output, m):
        with self.autocast():
            return self.loss_sum(output, self.state.targets[m]) / self.state.units

    def _forward(self, action):
        st, m, c = self.state, action.microbatch, self.model_chunk(action)
        value = self.chunk_input(action)
        if recomputes(self.spec.recompute, m, self.spec.n_microbatches):
            with torch.no_grad():
                output = self.run_chunk(value, action)
                if c == self.last_chunk:
                    st.add_loss(self.loss(output, m))
            st.stashed_inputs[action.chunk, m] = value
        else:
            leaf = grad_leaf(value) if c > 0 else value
            output = self.run_chunk(leaf, action)
            if c == self.last_chunk:
                output = self.loss(output, m)
                st.add_loss(output)
            st.graphs[action.chunk, m] = (leaf, output)
        if c < self.last_chunk:
            if self._local(c + 1):  # the next chunk is on this rank (the next local one): hand over in memory
                st.act_from_prev[action.chunk + 1, m] = values.detached(output)
            else:
                st.act_to_next[action.chunk, m] = values.detached(output)

    def send_act(self, action):
        key = (action.chunk, action.microbatch)
        value = self.state.act_to_next.pop(key)
        self.state.sent_like[key] = values.grad_spec(value)
        self.comm.send(value, self.rank_of(self._peer(action)), tag=ACTIVATION,
                       what=f"activation of micro-batch {action.microbatch}")

    # ---- the backward half --------------------------------------------------------------------
    def _recv_grad(self, action):
        key, peer = (action.chunk, action.microbatch), self._peer(action)
        self.state.grad_from_next[key] = self._receive(
            action, Kind.RECV_GRAD, self.rank_of(peer), GRADIENT, self._about("gradient", action, peer),
            expect_like=self.state.sent_like.pop(key))

    def _backward_graph(self, action):
        """(input leaf, outputs, their gradients) of a backward: the graph kept since the forward,
        or rebuilt by the recompute; on the last chunk the output is the scaled loss."""
        st, m, c, key = self.state, action.microbatch, self.model_chunk(action), (action.chunk, action.microbatch)
        if key in st.stashed_inputs:
            start = self.clock.mark()
            with self.autocast():
                leaf, output = recompute_forward(self.stage, st.stashed_inputs.pop(key), self.step_index,
                                                 self._global_microbatch(m), input_grad=c > 0, chunk=action.chunk)
            if c == self.last_chunk:
                output = self.loss(output, m)
            self.clock.add("recompute", m, _named_chunk(action), start, self.clock.mark())  # nested in backward
        else:
            leaf, output = st.graphs.pop(key)
        if c == self.last_chunk:
            loss = output * self.scale.scale
            return leaf, [loss], [torch.ones_like(loss)]
        outs = [o for o in values.as_tuple(output) if o.is_floating_point()]
        pairs = [(o, g) for o, g in zip(outs, values.as_tuple(st.grad_from_next.pop(key))) if o.requires_grad]
        return leaf, [o for o, _ in pairs], [g for _, g in pairs]

    def _backward(self, action):
        leaf, outputs, grads = self._backward_graph(action)
        torch.autograd.backward(outputs, grads)
        self._input_grad_made(action, leaf)

    def _backward_input(self, action):
        """I: the input gradient only; the graph stays alive for this unit's W."""
        leaf, outputs, grads = self._backward_graph(action)
        inputs = [t for t in values.as_tuple(leaf) if t.requires_grad]
        self.state.weight_grads_pending[action.chunk, action.microbatch] = backward_input(outputs, grads, inputs)
        self._input_grad_made(action, leaf)

    def _backward_weight(self, action):
        """W: the weight gradients its I left (minipipe/pipeline/split_backward.py)."""
        backward_weight(self.state.weight_grads_pending.pop((action.chunk, action.microbatch)))

    def _input_grad_made(self, action, leaf):
        st, m, c = self.state, action.microbatch, self.model_chunk(action)
        if c > 0:
            if self._local(c - 1):  # the previous chunk is on this rank (the previous local one)
                st.grad_from_next[action.chunk - 1, m] = values.input_grads(leaf)
            else:
                st.grad_to_prev[action.chunk, m] = values.input_grads(leaf)

    def _send_grad(self, action):
        self.comm.send(self.state.grad_to_prev.pop((action.chunk, action.microbatch)),
                       self.rank_of(self._peer(action)), what=f"gradient of micro-batch {action.microbatch}",
                       tag=GRADIENT)

    # ---- after the drain ----------------------------------------------------------------------
    def _params(self):
        return [p for p in self.stage.parameters() if p.requires_grad]

    def _collective(self, what: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), a collective of this step: a peer that died or timed out there
        becomes a PipelineError naming `what`, this rank and the step."""
        return collective(self.layout, what, partial(fn, *args, **kwargs), step=self.step_index,
                          timeout_s=self.spec.timeout_s)

    def _allreduce(self, _):
        """Sum gradients over the dp replicas of this stage (their losses were already divided by
        the global unit count), then settle BatchNorm running statistics. The gradient buckets
        start as soon as the stage's last backward has ended, before this rank waits for its own
        last sends."""
        lay = self.layout
        buckets = self._start_grad_buckets() if lay.dp > 1 else []
        if self.comm is not None:
            self.comm.wait_sends()
        for work, flat, grads in buckets:
            self._collective("the data-parallel gradient all-reduce", work.wait)
            for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                grad.copy_(synced)
        # the tied embedding's two copies get their summed gradient
        self.tied.sum_copies(partial(self._collective, "the tied-embedding gradient all-reduce", dist.all_reduce))
        if self.stats_layers:  # BatchNorm: one flat collective over this stage's replicas
            all_reduce = partial(self._collective, "the BatchNorm statistics all-reduce", dist.all_reduce,
                                 group=lay.stage_group)
            if self.spec.deferred_bn:
                running_stats.commit_deferred(self.stats_layers, all_reduce if lay.dp > 1 else None)
            elif lay.dp > 1:  # per-micro-batch statistics differ per replica: keep replicas equal
                running_stats.average_buffers(self.stage, all_reduce, lay.dp)

    def _start_grad_buckets(self) -> list[tuple]:
        """(work, flat bucket, its gradients) of asynchronous all-reduces over the stage's dp
        group: gradients in buckets of about BUCKET_BYTES, the last layers' first (DDP's order),
        so the flat copies cost a bucket of memory each rather than all the gradients twice."""
        params = self._params()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        buckets, current, size = [], [], 0
        for p in reversed(params):
            if current and (size + p.grad.nbytes > BUCKET_BYTES or p.grad.dtype != current[0].dtype):
                buckets.append(current)
                current, size = [], 0
            current.append(p.grad)
            size += p.grad.nbytes
        buckets.append(current)
        started = []
        for grads in buckets:
            flat = torch._utils._flatten_dense_tensors(grads)
            work = self._collective("the data-parallel gradient all-reduce", dist.all_reduce, flat,
                                    group=self.layout.stage_group, async_op=True)
            started.append((work, flat, grads))
        return started

    def _update(self, lr: float, grad_clip: float):
        """Global gradient norm over all stages, in one collective that also carries the loss.
        Each parameter's norm travels in its own slot of one vector (its index in the whole
        model's parameter order), and every rank takes the norm of that vector: the same numbers
        as torch.nn.utils.clip_grad_norm_ on the whole model, bitwise, for any K and schedule."""
        params = self._params()
        packed = torch.zeros(self.n_param_slots + 1, dtype=torch.float64, device=self.device)
        if self.layout.dp_rank == 0:  # replicas hold equal gradients after the all-reduce: count one
            grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.norm_params]
            packed[self.param_slots] = torch.stack(torch._foreach_norm(grads)).double()
        if self.state.loss_total is not None:
            packed[-1] = self.state.loss_total
        start = self.clock.mark()
        if self.layout.world_size > 1:
            self._collective("the gradient-norm all-reduce", dist.all_reduce, packed)
        end = self.clock.mark()
        packed = packed.cpu()  # the step's one wait for the device: the norms and the loss
        # Every rank leaves this all-reduce at (nearly) the same instant: the timeline's common clock.
        self.clock.synced(end)
        self.clock.add("norm_allreduce", None, None, start, end)
        grad_norm = float(torch.linalg.vector_norm(packed[:-1])) / self.scale.scale
        loss = float(packed[-1])
        skipped = optim.update(self.optimizer, params, grad_norm, loss, self.step_index, lr, grad_clip, self.scale)
        self.result = {"loss": loss, "grad_norm": grad_norm, "skipped": skipped}

    # ---- forward only: evaluation and generation ----------------------------------------------
    def generate(self, prompt, n_new: int, max_context: int, temperature: float = 0.8, top_k: int = 40,
                 seed: int = 0):
        """Sampling through the pipeline: see minipipe.pipeline.generation."""
        return generate(self, prompt, n_new, max_context, temperature, top_k, seed, spec=self.spec)

    def evaluate(self, batches) -> float:
        """Mean loss over `batches` (global (inputs, targets)), on every rank: see minipipe.pipeline.evaluation."""
        return evaluate(self, batches, spec=self.spec)
