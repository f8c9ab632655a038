"""A checkpoint is untrusted input: it may name a class, but only our own families are ever built."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_flows.checkpoints import CheckpointError, allowed_model_classes, load_model_and_data
from lightning_flows.cli import main
from lightning_flows.models import FlowMatching, GenerativeModel


def _crafted(path, class_path: str, hparams: dict) -> None:
    torch.save({"lightning_flows_model_class": class_path, "hyper_parameters": hparams, "state_dict": {},
                "datamodule_hyper_parameters": {"dataset": "8gaussians"}}, path)


@pytest.mark.parametrize("class_path", ["subprocess.run", "os.system", "builtins.exec",
                                        "lightning_flows.data.GenerativeDataModule",
                                        "lightning_flows.models.base.GenerativeModel"])
def test_a_checkpoint_naming_a_foreign_callable_executes_nothing(tmp_path, class_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    _crafted(evil, class_path, {"args": ["touch", str(marker)], "command": f"touch {marker}"})
    with pytest.raises(CheckpointError) as info:
        load_model_and_data(evil)
    assert not marker.exists()
    message = str(info.value)
    assert str(evil) in message and class_path in message and "not a lightning-flows model" in message


def test_sample_command_refuses_the_crafted_checkpoint_with_a_clean_error(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    _crafted(evil, "subprocess.run", {"args": ["touch", str(marker)]})
    with pytest.raises(SystemExit) as info:
        main(["sample", "--ckpt", str(evil), "--out", str(tmp_path / "x.png")])
    assert not marker.exists()
    assert "subprocess.run" in str(info.value.code) and "refusing" in str(info.value.code)


def test_the_allow_list_is_exactly_our_exported_families():
    allowed = allowed_model_classes()
    assert GenerativeModel not in allowed.values()
    assert all(issubclass(cls, GenerativeModel) for cls in allowed.values())
    assert allowed["lightning_flows.models.flow_matching.FlowMatching"] is FlowMatching
    assert {"VAE", "GAN", "RealNVP", "Glow", "CNF", "Diffusion", "FlowMatching"} <= set(allowed)


def test_an_own_class_with_unexpected_hyperparameters_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    _crafted(bad, "lightning_flows.models.flow_matching.FlowMatching", {"no_such_argument": 1})
    with pytest.raises(CheckpointError, match="could not rebuild FlowMatching"):
        load_model_and_data(bad)


def test_a_checkpoint_that_is_not_a_dict_is_a_clear_error(tmp_path):
    odd = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], odd)
    with pytest.raises(CheckpointError, match="not a lightning-flows checkpoint"):
        load_model_and_data(odd)


# ---- a pickle that runs a shell command when unpickled, through every way a weights file reaches us ----
class _RunsShellOnUnpickle:
    """Unpickling this object calls ``os.system("touch <marker>")``: the marker proves code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        import shlex

        return os.system, (f"touch {shlex.quote(self.marker)}",)


def _booby_trapped(path, marker) -> None:
    """A checkpoint-shaped file (one of our families, weights, options) that also carries the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"lightning_flows_model_class": "lightning_flows.models.flow_matching.FlowMatching",
                "state_dict": {}, "hyper_parameters": {"hidden": 32}, "payload": _RunsShellOnUnpickle(marker)}, path)


class _QuietHandler:
    """Lazily built ``SimpleHTTPRequestHandler`` that logs nothing."""

    @staticmethod
    def make(directory):
        import functools
        import http.server

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        return functools.partial(Handler, directory=str(directory))


@pytest.fixture
def http_root(tmp_path):
    """An HTTP server on localhost serving ``tmp_path/served``: yields (directory, base URL)."""
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler.make(served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _says_why_not_how_to_unpickle(message: str) -> None:
    """The refusal names the code it kept from running, and never passes on torch's advice to retry the load
    with ``weights_only=False`` (the call that runs it)."""
    assert "could run code; torch: Trying to load unsupported GLOBAL posix.system" in message, message
    assert "weights_only" not in message, message


TOY = "experiments/toy2d/flow_matching.yaml"


def _cli_args(root, *extra):
    from conftest import ROOT, quiet_fit_args

    return ["--config", str(ROOT / TOY), *quiet_fit_args(root), "--trainer.max_steps", "3",
            "--model.init_args.hidden", "32", "--model.init_args.sampler.steps", "2", "--sample_grid.n", "16", *extra]


def _ckpt_path_as(kind: str, tmp_path, http_root, marker) -> tuple[str, str]:
    """Place the booby-trapped file where ``--ckpt_path <value>`` finds it; returns (value, the file's name)."""
    if kind == "http":
        served, base = http_root
        _booby_trapped(served / "evil.ckpt", marker)
        return f"{base}/evil.ckpt", f"{base}/evil.ckpt"
    if kind == "last":  # the newest checkpoint of the experiment's earlier runs
        last = tmp_path / "runs" / "toy2d_flow_matching" / "version_0" / "checkpoints" / "last.ckpt"
        _booby_trapped(last, marker)
        return "last", str(last)
    if kind == "hpc":  # Lightning's SLURM requeue checkpoint in the root directory
        hpc = tmp_path / "runs" / "hpc_ckpt_3.ckpt"
        _booby_trapped(hpc, marker)
        return "hpc", str(hpc)
    evil = tmp_path / "downloads" / "evil.ckpt"
    _booby_trapped(evil, marker)
    if kind == "symlink":
        link = tmp_path / "model.ckpt"
        link.symlink_to(evil)
        return str(link), str(link)
    if kind == "file_url":
        return evil.as_uri(), str(evil)
    return str(evil), str(evil)


@pytest.mark.parametrize("subcommand,kind,extra", [
    ("fit", "path", []), ("fit", "symlink", []), ("fit", "file_url", []), ("fit", "http", []),
    ("fit", "last", []), ("fit", "hpc", []),
    # Without RunCheckpoint the trainer keeps Lightning's own CheckpointIO unless the CLI replaces it.
    ("fit", "http", ["--trainer.enable_checkpointing", "false"]),
    ("fit", "file_url", ["--trainer.enable_checkpointing", "false"]),
    ("fit", "hpc", ["--trainer.enable_checkpointing", "false"]),
    ("validate", "http", []), ("test", "http", []), ("validate", "file_url", []), ("test", "symlink", []),
    # `sample --ckpt`: the same reader.
    ("sample", "path", []), ("sample", "symlink", []), ("sample", "file_url", []), ("sample", "http", []),
])
def test_a_pickle_payload_never_runs_through_ckpt_path(tmp_path, http_root, subcommand, kind, extra):
    marker = tmp_path / "pwned"
    value, named = _ckpt_path_as(kind, tmp_path, http_root, marker)
    with pytest.raises(SystemExit) as info:
        if subcommand == "sample":
            main(["sample", "--ckpt", value, "--out", str(tmp_path / "x.png")])
        else:
            main([subcommand, *_cli_args(tmp_path / "runs", *extra), "--ckpt_path", value])
    message = str(info.value.code)
    assert not marker.exists(), f"{subcommand} with checkpoint {value} ran the payload"
    assert message.startswith("error: ") and named in message, message
    if kind == "http":
        assert "not a local file" in message and "Download it yourself" in message
        assert "pass the local file instead (e.g. --ckpt_path model.ckpt, sample --ckpt model.ckpt)" in message
    else:
        assert "Could not read checkpoint" in message and "corrupt, truncated or not a lightning-flows" in message
        _says_why_not_how_to_unpickle(message)
    assert not list((tmp_path / "runs").glob("*/version_*/checkpoints/*.ckpt")) or kind == "last"
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("value", ["registry:some-model:latest", "s3://bucket/model.ckpt", "file://otherhost/x.ckpt"])
def test_remote_checkpoints_are_refused_with_the_fix(tmp_path, value):
    expected = (r"^error: " + re.escape(value) + r" is not a local file: lightning-flows reads checkpoints only from "
                r"local disk.*Download it yourself .* and pass the local file instead \(e.g. --ckpt_path model.ckpt")
    with pytest.raises(SystemExit, match=expected):
        main(["fit", *_cli_args(tmp_path / "runs"), "--ckpt_path", value])


def test_ckpt_path_best_in_a_fresh_process_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --ckpt_path best means the best checkpoint of a fit run earlier in "
                                         r"the same Python process.*Pass the checkpoint file"):
        main(["test", *_cli_args(tmp_path / "runs"), "--ckpt_path", "best"])


def test_ckpt_path_hpc_without_an_hpc_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --ckpt_path hpc: there is no hpc_ckpt_<n>.ckpt"):
        main(["fit", *_cli_args(tmp_path / "runs"), "--ckpt_path", "hpc"])


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A real last.ckpt of a 2-step flow-matching run (hidden 32)."""
    root = tmp_path_factory.mktemp("trained")
    main(["fit", *_cli_args(root), "--trainer.max_steps", "2"])
    (last,) = root.glob("**/last.ckpt")
    return last


@pytest.mark.parametrize("key", ["_class_path", "class_path", "_instantiator"])
def test_a_class_path_inside_a_checkpoint_is_never_imported(trained_checkpoint, tmp_path, monkeypatch, key):
    """``hyper_parameters._class_path`` (Lightning's CLI turns it into ``model.class_path``, which jsonargparse
    imports) naming a module in the current directory: the module must not run, and the run resumes as the
    allow-listed family the checkpoint records."""
    marker = tmp_path / "imported"
    module = f"lf_planted_{key.strip('_')}"
    (tmp_path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Model:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python -m` puts the current directory first
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"][key] = f"{module}.Model"
    planted = tmp_path / "planted.ckpt"
    torch.save(checkpoint, planted)
    main(["fit", *_cli_args(tmp_path / "runs"), "--ckpt_path", str(planted)])
    assert not marker.exists(), f"hyper_parameters.{key} was imported"
    (last,) = (tmp_path / "runs").glob("**/last.ckpt")
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 3 and resumed["lightning_flows_model_class"].endswith("FlowMatching")
    assert resumed["hyper_parameters"].get("_class_path") != f"{module}.Model"


def test_sample_reads_a_file_url_as_its_file_and_writes_beside_its_run(trained_checkpoint, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.chdir(tmp_path)  # nothing may land in a directory named after the URL ("file:/...") here
    main(["sample", "--ckpt", trained_checkpoint.as_uri(), "--n", "4"])
    written = trained_checkpoint.parent.parent / "samples" / "sample_n4_seed0.png"
    assert written.is_file() and f"wrote 4 samples to {written}" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


# ---- weights files handed to torch-fidelity ----
def test_an_inception_weights_file_holding_a_payload_is_refused(tmp_path):
    from lightning_flows.metrics.features import build_feature_extractor

    marker, evil = tmp_path / "pwned", tmp_path / "weights-inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "x": _RunsShellOnUnpickle(marker)}, evil)
    with pytest.raises(RuntimeError, match=rf"Could not read Inception weights file {re.escape(str(evil))} as a state "
                                           rf"dict .*refusing to load it. Pass weights-inception-\S+\.pth") as info:
        build_feature_extractor("inception", weights_path=evil)
    assert not marker.exists()
    _says_why_not_how_to_unpickle(str(info.value))


def test_a_poisoned_torch_hub_cache_of_the_inception_weights_is_refused(tmp_path, monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from lightning_flows.metrics.features import InceptionFeatures

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"x": _RunsShellOnUnpickle(marker)}, cached)
    with pytest.raises(RuntimeError, match=rf"cached Inception-v3 weights {re.escape(str(cached))} are not a plain "
                                           rf"state dict .*Delete the file and download it again") as info:
        InceptionFeatures()
    assert not marker.exists()
    _says_why_not_how_to_unpickle(str(info.value))
