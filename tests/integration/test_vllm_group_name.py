"""The ops resolve vLLM's own group names ("tp:0") on a real vLLM TP group."""


from support.cases import Case
from devtools.vllm_cpu import agree_on_dist_ident, rank_setup
from support.multirank import shared


def run_on_vllm_tp_group(rank, world_size):
    import torch.distributed as dist
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    from support.op_runs import run_mm_reduce_scatter, run_all_gather_mm

    agree_on_dist_ident()  # vLLM's shm communicator (AVX-512 kernels) names its segment from it, alike on all ranks
    with set_current_vllm_config(VllmConfig()):
        parallel_state.init_distributed_environment(
            world_size=world_size, rank=rank, local_rank=rank, backend="gloo",
            distributed_init_method="env://",  # unused: the harness already initialized torch.distributed
        )
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
        tp = parallel_state.get_tp_group()
        assert dist.is_initialized()
        results = [
            run_mm_reduce_scatter(Case(m=64, k=32, bias=True, threshold=0), rank, world_size, tp.unique_name),
            run_all_gather_mm(Case(m=8, k=32, ns=(16, 8), threshold=0), rank, world_size, tp.unique_name),
        ]
        parallel_state.destroy_model_parallel()
        return {"name": tp.unique_name, "results": results}


ON_VLLM_TP_GROUP = shared(run_on_vllm_tp_group, setup=rank_setup, timeout=240)  # in the vLLM model tests' ranks


def test_ops_accept_vllm_group_name():
    per_rank = ON_VLLM_TP_GROUP()
    for r in per_rank:
        assert r["name"].startswith("tp:")
        for res in r["results"]:
            assert res["decision"][1] == "fused" and res["error"] <= 1e-5
