"""Run by tests/test_discrete_likelihoods.py: fit the digits VAE (discretised-logistic decoder) and/or DDPM
(discretised decoder) through the CLI on 2 CPU ranks (gloo), so the DataModule's levels are linked on
every rank; each rank then scores the same validation examples and saves OUT/<family>_rank<r>.pt.

    python tests/ddp_discrete_probe.py OUT STEPS vae,diffusion
"""

import sys
from pathlib import Path

import torch

from lightning_flows.ode import SolverConfig
from lightning_flows.training import build_cli

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"vae": ["--model.init_args.decoder", "discretized_logistic"],
            "diffusion": ["--model.init_args.decoder", "discretized", "--model.init_args.num_steps", "20",
                          "--model.init_args.base_channels", "8", "--model.init_args.channel_mults", "[1]",
                          "--model.init_args.bound_timesteps", "2"]}


def main(out: Path, steps: int, families: list[str]) -> None:
    for family in families:
        overrides = FAMILIES[family]
        cli = build_cli(["fit", "--config", str(ROOT / f"experiments/digits/{family}.yaml"), *overrides,
                         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                         "--trainer.max_epochs", "-1", "--trainer.max_steps", str(steps), "--trainer.logger", "false",
                         "--trainer.enable_checkpointing", "false", "--trainer.limit_val_batches", "0",
                         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                         "--sample_grid.every_n_epochs", "1000", "--trainer.callbacks", "[]"])
        model, dm, rank = cli.model.eval(), cli.datamodule, cli.trainer.global_rank
        x = dm.split("val")[:16]
        scores = {}
        for kind in ("bound", "ode") if family == "diffusion" else ("bound",):
            torch.manual_seed(0)
            model.likelihood_solver = SolverConfig("euler", steps=3)
            scores[kind] = model.log_prob(x, kind=kind) if family == "diffusion" else model.log_prob(x)
        parameters = {name: p.detach() for name, p in model.named_parameters()}
        torch.save({"data_levels": model.data_levels, "parameters": parameters, "scores": scores,
                    "world_size": cli.trainer.world_size, "bpd": dm.bits_per_dim(-scores["bound"].mean())},
                   out / f"{family}_rank{rank}.pt")


if __name__ == "__main__":
    from lightning_flows.cli import end_distributed  # every rank ends its process group together

    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(","))
    end_distributed()
