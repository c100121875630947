"""Validation loss through the pipeline, forward only.

    loss = evaluate(engine, batches, spec=spec)   # on every rank; batches: global (inputs, targets)

The forward part of the schedule's training list (schedule.actions.forward_part) runs on every batch with the engine's
receives and sends; the last chunk adds each micro-batch's summed loss to a device scalar, so
the host reads the total once, after the last batch and one all-reduce. The result is the mean
over every counted unit (token or sample) of all batches, as training's loss is for one batch.
"""
import torch
import torch.distributed as dist

from minipipe.pipeline.collectives import collective
from minipipe.pipeline.spec import PipelineSpec
from minipipe.schedule.actions import Kind, forward_part


@torch.no_grad()
def evaluate(engine, batches, *, spec: PipelineSpec) -> float:
    engine.stage.eval()
    lay = engine.layout
    actions = forward_part(spec.actions[lay.stage])

    def forward(action):
        st, m = engine.state, action.microbatch
        output = engine.run_chunk(engine.chunk_input(action), action)
        c = engine.model_chunk(action)
        if c == engine.last_chunk:
            st.add_loss(engine.loss(output, m))
        elif spec.placement[c + 1] == lay.stage:  # the next chunk is on this rank: hand over in memory
            st.act_from_prev[action.chunk + 1, m] = output
        else:
            st.act_to_next[action.chunk, m] = output
    handlers = {Kind.RECV_ACT: engine.recv_act, Kind.FORWARD: forward, Kind.SEND_ACT: engine.send_act}
    total, units = torch.zeros(1, dtype=torch.float64, device=engine.device), 0
    for inputs, targets in batches:
        engine.begin(inputs, targets, step=0)
        engine.run(actions, handlers)
        if engine.state.loss_total is not None:
            total += engine.state.loss_total * engine.state.units
        units += engine.state.units
    if engine.comm is not None:
        engine.comm.wait_sends()
    if lay.world_size > 1:
        collective(lay, "the evaluation loss all-reduce", lambda: dist.all_reduce(total),
                   timeout_s=spec.timeout_s)
    return float(total) / units
