"""lightning-flows beside its peers, in one run: the same network, batch and solver settings on both sides.

    python experiments/benchmarks/peers.py --install    # pip-installs the peers into a scratch venv, then runs
    python experiments/benchmarks/peers.py              # uses whichever peers are importable; skips the others

Peers (installed from PyPI into ``--venv``, a scratch virtual environment that sees this one's packages, so torch
and lightning-flows' own dependencies are shared: :func:`make_scratch_venv`; nothing of theirs is copied here):
``torchcfm``, ``flow_matching`` (Meta) and ``normflows``.

1. **Flow-matching training step** vs torchcfm's ``ConditionalFlowMatcher`` (sigma = 0, the lecture's
   independent coupling): one optimizer step of our ``FlowMatching.training_loss`` against torchcfm's
   ``sample_location_and_conditional_flow`` + the same network + MSE, both in the same hand loop (Adam,
   same data batch), for the toy2d MLP and the digits UNet of the committed configs.
2. **Exact log-likelihood** vs flow_matching's ``ODESolver.compute_likelihood(exact_divergence=True)``: the
   same velocity network (trained briefly by us, so the ODE is a realistic one), the same torchdiffeq dopri5
   at rtol = atol = 1e-5 on both sides ("equal accuracy"; the table shows the largest difference between the
   two log-likelihoods and each side's NFE). flow_matching's exact divergence loops over ``x.shape[1]``, so
   it is defined for vectors only: toy2d (D = 2) and 8x8 digits flattened (D = 64, an MLP).
3. **RealNVP / Glow training step** vs normflows: toy2d RealNVP (6 affine couplings, conditioners with two
   hidden layers of 64, ReLU; normflows' ``AffineCouplingBlock`` + swap ``Permute``) and a one-level Glow on
   digits (squeeze, 4 steps of ActNorm + LU 1x1 conv + coupling with a 3x3-1x1-3x3 conv net of width 64;
   normflows' ``GlowBlock``), data -> latent log-likelihood loss, Adam, same batch.

Each comparison runs its two sides back to back for ``--rounds`` rounds in alternating order and reports the
median throughput of each and the median per-round ratio ours / theirs (> 1: we are faster). One intra-op
thread by default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runnable without `pip install -e .`, also from the peers' venv

PEERS = {"torchcfm": "torchcfm", "flow_matching": "flow_matching", "normflows": "normflows"}  # module: pip name
DEFAULT_VENV = "/tmp/lightning-flows-peers"


# ---- installing the peers ----
def make_scratch_venv(venv: Path, with_pip: bool = True) -> Path:
    """Create ``venv`` (if needed) so that it sees this environment's packages; returns its python.

    ``python -m venv --system-site-packages`` run from inside a virtual environment (``make install``'s) shares
    the *base* interpreter's site-packages, not this environment's: no lightning, no torch. So the scratch venv
    gets a ``.pth`` file that adds this environment's site directories (``site.addsitedir``, which also runs
    their ``.pth`` files, e.g. an editable install's) after its own: the peers pip installs there come first,
    and pip sees torch and the rest as installed instead of fetching them again.
    """
    import site
    import sysconfig

    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} (python -m venv, sharing {sys.prefix}'s packages)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(venv)],
                       check=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    if site.ENABLE_USER_SITE:
        ours.append(site.getusersitepackages())
    lines = [f"import site; site.addsitedir({directory!r})" for directory in dict.fromkeys(ours)
             if Path(directory).is_dir() and Path(directory).resolve() != Path(purelib).resolve()]
    (Path(purelib) / "lightning_flows_environment.pth").write_text("\n".join(lines) + "\n")
    return python


def install_and_rerun(venv: Path, argv: list[str]) -> None:
    """Create ``venv`` (sharing this environment's packages), pip-install the peers there, re-run inside it."""
    python = make_scratch_venv(venv)
    print(f"pip install {' '.join(PEERS.values())} into {venv}", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS.values()], check=True)
    args = [a for a in argv if a != "--install"]
    os.execv(str(python), [str(python), __file__, *args])


def available_peers() -> dict[str, bool]:
    import importlib.util

    return {name: importlib.util.find_spec(name) is not None for name in PEERS}


def peer_version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(PEERS[name])
    except Exception:  # noqa: BLE001 - only a label
        return "?"


# ---- timing ----
def rate(step, steps: int, warmup: int) -> float:
    """Calls of ``step`` per second over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def interleaved(ours, theirs, rounds: int) -> dict:
    """``ours()`` / ``theirs()`` return a throughput; alternate which goes first, median over rounds."""
    a, b, ratios = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            x, y = ours(), theirs()
        else:
            y, x = theirs(), ours()
        a.append(x)
        b.append(y)
        ratios.append(x / y)
    return {"ours": statistics.median(a), "theirs": statistics.median(b), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def row(name: str, unit: str, res: dict, note: str = "") -> str:
    return (f"| {name} | {res['ours']:.1f} {unit} | {res['theirs']:.1f} {unit} | {res['ratio']:.2f} "
            f"({res['ratio_min']:.2f}-{res['ratio_max']:.2f}) | {note} |")


# ---- shared set-up ----
def load_config_model(config: str):
    """Model and datamodule of a committed config, as ``lightning-flows fit`` builds them."""
    import contextlib
    import io

    from lightning_flows.training import build_cli

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli = build_cli(["--config", str(ROOT / config), "--trainer.logger", "false",
                         "--trainer.enable_checkpointing", "false"], run=False)
    cli.datamodule.setup("fit")
    return cli.model, cli.datamodule


def train_batches(dm, n: int):
    """``n`` training batches in model space, drawn once (both sides train on exactly these)."""
    import torch

    torch.manual_seed(0)
    data, size, levels = dm.splits.train, dm.batch_size, dm.levels
    batches = []
    for _ in range(n):
        x = data[torch.randint(len(data), (size,))]
        if levels is not None:
            x = 2.0 * (x.float() + torch.rand(x.shape)) / levels - 1.0
        batches.append(x)
    return batches


def stepper(loss_fn, params, batches):
    """One Adam step of ``loss_fn(batch)`` per call, cycling through ``batches``."""
    import torch

    optimizer = torch.optim.Adam(params, lr=1e-4)
    state = {"i": 0}

    def step():
        x = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = loss_fn(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


# ---- 1. flow matching vs torchcfm ----
def fm_vs_torchcfm(opts) -> list[str]:
    return [fm_case(config, steps, opts.rounds) for config, steps in
            (("experiments/toy2d/flow_matching.yaml", 200), ("experiments/digits/flow_matching.yaml", 30))]


def fm_case(config: str, steps: int, rounds: int) -> str:
    import copy

    import torch
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

    model, dm = load_config_model(config)
    batches = train_batches(dm, 16)
    matcher = ConditionalFlowMatcher(sigma=0.0)

    def ours():
        m = copy.deepcopy(model).train()
        return rate(stepper(m.training_loss, list(m.parameters()), batches), steps, 5) * dm.batch_size

    def theirs():
        net = copy.deepcopy(model.velocity).train()

        def loss(x1):
            t, xt, ut = matcher.sample_location_and_conditional_flow(torch.randn_like(x1), x1)
            return (net(xt, t) - ut).pow(2).mean()
        return rate(stepper(loss, list(net.parameters()), batches), steps, 5) * dm.batch_size

    return row(f"FM training step, {config} (batch {dm.batch_size})", "ex/s", interleaved(ours, theirs, rounds),
               "same network, batch and Adam; ours draws x0, t inside training_loss")


# ---- 2. exact likelihood vs flow_matching ----
def likelihood_vs_flow_matching(opts) -> list[str]:
    return [likelihood_case("toy2d, D = 2", "8gaussians", (2,), 500, opts),
            likelihood_case("digits flattened, D = 64", "digits", (64,), 50, opts)]


def likelihood_case(name: str, dataset: str, shape: tuple[int, ...], n: int, opts) -> str:
    import torch
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    from lightning_flows.data import GenerativeDataModule
    from lightning_flows.models import FlowMatching
    from lightning_flows.ode import SolverConfig
    from lightning_flows.ode.likelihood import standard_normal_log_prob

    dm = GenerativeDataModule(dataset, batch_size=128)
    dm.setup()
    torch.manual_seed(0)
    model = FlowMatching(data_shape=shape, backbone="mlp", hidden=256, depth=3, likelihood_divergence="exact")
    train = dm.split("train").reshape(-1, *shape)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(opts.fm_train_steps):  # a briefly trained field: a realistic ODE for the solver
        loss = model.training_loss(train[torch.randint(len(train), (128,))])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x = dm.split("test").reshape(-1, *shape)[:n]
    counter = counted_velocity(model.velocity, ModelWrapper)
    solver = ODESolver(velocity_model=counter)
    config = SolverConfig(method="dopri5", rtol=1e-5, atol=1e-5)
    results = {}

    def ours():
        start = time.perf_counter()
        results["ours"], results["ours_nfe"] = exact_log_prob(model, x, config)
        return n / (time.perf_counter() - start)

    def theirs():
        counter.calls = 0
        start = time.perf_counter()
        _, log_p = solver.compute_likelihood(x_1=x, log_p0=standard_normal_log_prob, step_size=None,
                                             method="dopri5", atol=1e-5, rtol=1e-5, exact_divergence=True)
        results["theirs"], results["theirs_nfe"] = log_p.detach(), counter.calls
        return n / (time.perf_counter() - start)

    res = interleaved(ours, theirs, opts.rounds)
    gap = float((results["ours"] - results["theirs"]).abs().max())
    return row(f"exact log-likelihood, {name} ({n} examples, one batch)", "ex/s", res,
               f"dopri5 1e-5 both; max abs log p difference {gap:.1e}; NFE {results['ours_nfe']} vs "
               f"{results['theirs_nfe']}")


def exact_log_prob(model, x, solver) -> tuple:
    """Our side of the likelihood comparison: ``(log p(x): (B,), NFE)`` with the solver settings ``solver``."""
    import torch

    with torch.no_grad():
        log_p = model.log_prob(x, solver=solver)  # (the second positional argument is class labels)
    return log_p, model.last_log_prob_nfe


def counted_velocity(velocity, wrapper_base):
    """flow_matching's ``ModelWrapper`` around our velocity network, counting its calls (the NFE)."""

    class Counted(wrapper_base):
        def forward(self, x, t, **extras):
            self.calls += 1
            return self.model(x, t)

    counted = Counted(velocity)
    counted.calls = 0
    return counted


# ---- 3. RealNVP / Glow vs normflows ----
def flows_vs_normflows(opts) -> list[str]:
    import torch
    import normflows as nf

    from lightning_flows.data import GenerativeDataModule
    from lightning_flows.models import Glow, RealNVP

    rows = []
    # toy2d RealNVP
    dm = GenerativeDataModule("8gaussians", batch_size=512)
    dm.setup()
    batches = train_batches(dm, 16)

    def ours_realnvp():
        torch.manual_seed(0)
        m = RealNVP(data_shape=(2,), architecture="mlp", steps=6, hidden=64, depth=2, activation="relu",
                    scale_bound=3.0, actnorm=False)
        return rate(stepper(m.training_loss, list(m.parameters()), batches), opts.flow_steps, 5) * 512

    def theirs_realnvp():
        torch.manual_seed(0)
        flows = []
        for _ in range(6):
            flows += [nf.flows.AffineCouplingBlock(nf.nets.MLP([1, 64, 64, 2], init_zeros=True), scale_map="exp"),
                      nf.flows.Permute(2, mode="swap")]
        m = nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), flows)
        return rate(stepper(lambda x: m.forward_kld(x) / 2, list(m.parameters()), batches), opts.flow_steps, 5) * 512

    rows.append(row("RealNVP training step, toy2d (6 couplings, 64x2 MLPs, batch 512)", "ex/s",
                    interleaved(ours_realnvp, theirs_realnvp, opts.rounds),
                    "normflows AffineCouplingBlock + swap Permute"))

    # digits Glow, one level
    dm = GenerativeDataModule("digits", batch_size=64)
    dm.setup()
    batches = train_batches(dm, 16)

    def ours_glow():
        torch.manual_seed(0)
        m = Glow(data_shape=(1, 8, 8), architecture="multiscale", levels=1, steps=4, hidden=64, depth=2,
                 preprocess="none")
        return rate(stepper(m.training_loss, list(m.parameters()), batches), opts.flow_steps // 4, 3) * 64

    def theirs_glow():
        torch.manual_seed(0)
        flows = [nf.flows.GlowBlock(4, 64, split_mode="channel", scale=True) for _ in range(4)] + [nf.flows.Squeeze()]
        m = nf.NormalizingFlow(nf.distributions.DiagGaussian((4, 4, 4), trainable=False), flows)
        dim = 64
        return rate(stepper(lambda x: m.forward_kld(x) / dim, list(m.parameters()), batches),
                    opts.flow_steps // 4, 3) * 64

    rows.append(row("Glow training step, digits 1x8x8 (1 level, 4 steps, width 64, batch 64)", "ex/s",
                    interleaved(ours_glow, theirs_glow, opts.rounds), "normflows GlowBlock + Squeeze"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="pip-install the peers into --venv and run there")
    parser.add_argument("--venv", default=DEFAULT_VENV)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flow-steps", type=int, default=200, help="timed steps per RealNVP run (Glow: 1/4)")
    parser.add_argument("--fm-train-steps", type=int, default=300, help="training of the likelihood's field")
    parser.add_argument("--only", nargs="+", choices=["fm", "likelihood", "flows"], default=None)
    opts = parser.parse_args()
    if opts.install and Path(sys.prefix).resolve() != Path(opts.venv).resolve():
        install_and_rerun(Path(opts.venv), sys.argv[1:])
    import torch

    torch.set_num_threads(opts.threads)
    have = available_peers()
    print(f"# peers: torch {torch.__version__}, {opts.threads} thread(s), {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; " + ", ".join(
              f"{name} {peer_version(name) if ok else 'absent'}" for name, ok in have.items()), flush=True)
    sections = [("fm", "torchcfm", fm_vs_torchcfm), ("likelihood", "flow_matching", likelihood_vs_flow_matching),
                ("flows", "normflows", flows_vs_normflows)]
    rows = []
    for key, peer, run in sections:
        if opts.only and key not in opts.only:
            continue
        if not have[peer]:
            print(f"skipped: {peer} is not installed (pip install {PEERS[peer]}, or run with --install)")
            continue
        new_rows = run(opts)
        print("\n".join(new_rows), flush=True)
        rows += new_rows
    if rows:
        print("\n| comparison | lightning-flows | peer | ours / peer (median, min-max) | notes |")
        print("|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
