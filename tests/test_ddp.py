"""2-rank DistributedDataParallel (gloo, CPU): training a ConvAutoencoder on two halves of each
batch gives the parameters of one process training on the whole batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS, BATCH = 3, 8
KWARGS = dict(in_channels=1, channels=(4, 6))


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(BATCH, 1, 12, 12, generator=g) for _ in range(STEPS)]


def _initial_state():
    from aefast.models import ConvAutoencoder

    torch.manual_seed(0)
    return ConvAutoencoder(**KWARGS).state_dict()


def _train(model, batches):
    """One process, whole batches: the mean loss over all 8 items (DDP averages the two ranks'
    gradients of their 4-item means, which is the same gradient)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for x in batches:
        loss = model.training_loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank, world, port, out):
    os.environ["AEFAST_BACKEND"] = "cpu"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from aefast.models import ConvAutoencoder

        model = ConvAutoencoder(**KWARGS)
        model.load_state_dict(_initial_state())
        ddp = DDP(model)
        # gradients are all-reduced by hooks that DDP arms in ITS forward, so the loss is computed
        # from ddp(x), with the same fused loss as training_loss
        from aefast import functional as AF

        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        for x in _batches():
            local = x.chunk(world)[rank]
            loss = AF.reconstruction_loss(ddp(local), local, "mse")
            opt.zero_grad()
            loss.backward()
            opt.step()
        if rank == 0:
            torch.save(model.state_dict(), out)
        dist.barrier()   # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_two_rank_ddp_matches_one_process_on_the_whole_batch(tmp_path):
    import aefast
    from aefast.models import ConvAutoencoder

    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ddp_state = torch.load(out)

    single = ConvAutoencoder(**KWARGS)
    single.load_state_dict(_initial_state())
    with aefast.set_backend("cpu"):
        _train(single, _batches())
    init = _initial_state()
    for k, v in single.state_dict().items():
        assert not torch.equal(v, init[k]), f"{k} did not train"
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-4, atol=1e-5, msg=k)
