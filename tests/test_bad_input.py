"""Bad input gets a clear error that names the fix; each test asserts the message.

(Also covered elsewhere: an unknown dataset name in tests/test_data.py and tests/test_cli.py, a checkpoint
naming a foreign class in tests/test_checkpoint_security.py.)
"""

from __future__ import annotations

import re

import pytest
import torch
from subprocess_runs import ROOT

from lightning_flows.cli import main
from lightning_flows.data import GenerativeDataModule
from lightning_flows.models import GAN
from lightning_flows.ode import SolverConfig, integrate
from lightning_flows.ode.solve import ODEStepSizeUnderflow

TOY = str(ROOT / "experiments/toy2d/flow_matching.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.accelerator", "cpu", "--sample_grid.n", "16", "--model.init_args.sampler.steps", "2"]


def _dirs(root) -> list[str]:
    return ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]


def _fit_error(capsys, *args: str) -> str:
    """Run ``lightning-flows fit`` expecting a clean exit with an error; return what it printed."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code != 0
    printed = capsys.readouterr().err
    return printed + (exit_info.value.code if isinstance(exit_info.value.code, str) else "")


# ---- unknown model, unknown config keys ----
@pytest.mark.parametrize("given", ["Flowmatching", "lightning_flows.models.Flowmatching"])
def test_unknown_model_lists_the_families_and_the_closest(tmp_path, capsys, given):
    message = _fit_error(capsys, "--config", TOY, *_dirs(tmp_path), "--model", given)
    listed = message.split("Choose a model family: ")[1].split(" (e.g.")[0].split(", ")
    lecture_and_beyond = {"CNF", "Diffusion", "FlowMatching", "GAN", "Glow", "NSF", "RealNVP", "VAE", "TarFlow",
                          "MeanFlow"}
    assert lecture_and_beyond <= set(listed)
    assert listed == sorted(listed)
    assert "Did you mean 'FlowMatching'?" in message


@pytest.mark.parametrize("option,suggestion", [("--trainer.max_stepz", "--trainer.max_steps"),
                                               ("--data.batchsize", "--data.batch_size"),
                                               ("--sample_grid.m", "--sample_grid.n")])
def test_unknown_command_line_option_suggests_the_closest(tmp_path, capsys, option, suggestion):
    message = _fit_error(capsys, "--config", TOY, *_dirs(tmp_path), option, "3")
    assert f"unrecognized arguments: {option}" in message.lower() and f"Did you mean '{suggestion}'" in message


def test_unknown_key_in_a_config_file_suggests_the_closest(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("trainer:\n  max_stepz: 3\n")
    message = _fit_error(capsys, "--config", TOY, "--config", str(config), *_dirs(tmp_path))
    assert "Unknown option --trainer.max_stepz. Did you mean '--trainer.max_steps'" in message


def test_unknown_model_option_names_the_family_its_options_and_the_closest(tmp_path, capsys):
    message = _fit_error(capsys, "--config", TOY, *_dirs(tmp_path), "--model.init_args.hiden", "3")
    assert "FlowMatching has no option 'hiden'. Did you mean 'hidden'?" in message
    assert "Its options: data_shape, backbone, hidden, depth" in message


# ---- a model that does not fit the data ----
@pytest.mark.parametrize("family,message", [
    ("glow", r"architecture='multiscale' needs images \(C, H, W\), got data_shape=\(2,\); use architecture='mlp'"),
    ("realnvp", r"architecture='multiscale' needs images .*use architecture='mlp' for vectors"),
    ("gan", r"ConvDecoder needs images of shape \(C, H, W\), got \(2,\); use an MLP \(`network: mlp`\)"),
    ("vae", r"ConvEncoder needs images of shape \(C, H, W\), got \(2,\); use an MLP \(`network: mlp`\)"),
    ("diffusion", r"TimeUNet needs image data of shape \(C, H, W\).*\(2,\).*backbone: mlp"),
    ("cnf", r"ConcatConvField needs image data of shape \(C, H, W\), got \(2,\); use field: mlp for vector data"),
])
def test_an_image_family_on_2d_data_names_the_vector_architecture(tmp_path, family, message):
    with pytest.raises(SystemExit, match="^error: " + message):
        main(["fit", "--config", str(ROOT / f"experiments/digits/{family}.yaml"), "--data.dataset", "8gaussians",
              *_dirs(tmp_path)])


def test_the_cnf_with_the_vector_field_but_the_logit_preprocessing_names_that_fix_next(tmp_path):
    """The digits CNF's second image-only setting, once its field is the MLP."""
    with pytest.raises(SystemExit, match=r"^error: preprocess='logit' needs images in \[-1, 1\] of shape \(C, H, W\), "
                                         r"got data_shape=\(2,\); use preprocess: none for vector data"):
        main(["fit", "--config", str(ROOT / "experiments/digits/cnf.yaml"), "--data.dataset", "8gaussians",
              "--model.init_args.field", "mlp", *_dirs(tmp_path)])


def test_a_model_built_for_another_channel_count_names_both_shapes():
    import lightning as L

    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"GAN was built for examples of shape \(3, 8, 8\) but got a batch of "
                                         r"shape \(64, 1, 8, 8\); check that the model and data configs agree"):
        trainer.fit(GAN((3, 8, 8)), GenerativeDataModule("digits", batch_size=64))


# ---- where the run writes, what it runs on ----
@pytest.mark.parametrize("option", ["--trainer.default_root_dir", "--trainer.logger.init_args.save_dir"])
def test_an_unwritable_output_directory_fails_before_training(tmp_path, option):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a directory cannot be made below a file (as root too, unlike a chmod)
    dirs = {"--trainer.default_root_dir": str(tmp_path / "ok"), "--trainer.logger.init_args.save_dir": str(tmp_path)}
    dirs[option] = str(blocker / "runs")
    args = [item for pair in dirs.items() for item in pair]
    with pytest.raises(SystemExit, match=rf"^error: Cannot write to {blocker / 'runs'} \(.*\); this run would lose "
                                         rf"its checkpoints, logs and samples there. Pass a writable directory "
                                         rf"with {option} DIR"):
        main(["fit", "--config", TOY, *QUIET, *args, "--trainer.max_steps", "1"])
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_more_gpus_than_the_machine_has(tmp_path):
    have = torch.cuda.device_count()
    with pytest.raises(SystemExit, match=rf"^error: --trainer.devices {have + 1} asks for {have + 1} CUDA GPU\(s\) "
                                         rf"but this machine has {have}.*Lower --trainer.devices \(at most {have}\)"
                                         rf".*--trainer.accelerator cpu"):
        main(["fit", "--config", TOY, *_dirs(tmp_path), "--trainer.accelerator", "gpu",
              "--trainer.devices", str(have + 1)])


# ---- FID without network access ----
def test_inception_fid_offline_without_weights_says_how_to_pass_a_local_file(tmp_path, monkeypatch):
    import urllib.error

    from lightning_flows.metrics.features import InceptionFeatures

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy either
    with pytest.raises(RuntimeError, match=r"Could not download torch-fidelity's Inception-v3 weights.*Offline, "
                                           r"fetch https://\S+\.pth on a connected machine and pass the local "
                                           r"file: feature_extractor_weights_path=<file.pth>"):
        InceptionFeatures()
    with pytest.raises(FileNotFoundError, match=r"Inception weights file .*missing.pth does not exist; pass the "
                                                r"path of weights-inception-\S+\.pth as "
                                                r"feature_extractor_weights_path"):
        InceptionFeatures(tmp_path / "missing.pth")


# ---- an ODE the adaptive solver cannot follow ----
def test_underflow_in_dt_names_the_solver_settings_to_change():
    blows_up = lambda x, t: x ** 2  # noqa: E731  x(t) = 2 / (1 - 2t): infinite at t = 1/2
    config = SolverConfig(method="dopri5", rtol=1e-5, atol=1e-5, max_nfe=100_000)
    with pytest.raises(ODEStepSizeUnderflow, match=r"adaptive ODE solver dopri5 \(rtol=1e-05, atol=1e-05\) shrank its "
                                                   r"step to nothing \(torchdiffeq: underflow in dt .*\).*loosen "
                                                   r"rtol/atol, or use a fixed-step method \(method: rk4 with steps"):
        integrate(blows_up, torch.full((3,), 2.0), config)


# ---- checkpoints: truncated, foreign, another family, another configuration ----
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Real last.ckpt files of tiny runs: flow matching (hidden 32 and 16) and a GAN, on toy 2D data."""
    root = tmp_path_factory.mktemp("ckpts")
    runs = {"fm": (TOY, ["--model.init_args.hidden", "32"]),
            "fm16": (TOY, ["--model.init_args.hidden", "16"]),
            "gan": (str(ROOT / "experiments/toy2d/gan.yaml"), ["--model.init_args.hidden", "16"])}
    paths = {}
    for name, (config, extra) in runs.items():
        extra = extra + (["--model.init_args.sampler.steps", "2"] if name != "gan" else [])
        main(["fit", "--config", config, *extra, *_dirs(root / name), "--trainer.max_steps", "2",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.accelerator", "cpu", "--sample_grid.n", "16"])
        (paths[name],) = (root / name).glob("**/last.ckpt")
    truncated = root / "truncated.ckpt"
    truncated.write_bytes(paths["fm"].read_bytes()[: paths["fm"].stat().st_size // 2])
    foreign = root / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, foreign)  # a torch file of someone else's
    paths.update(truncated=truncated, foreign=foreign)
    return paths


SAMPLE_AND_RESUME_ERRORS = {
    "truncated": r"Could not read checkpoint .*truncated.ckpt .*The file is corrupt, truncated or not a "
                 r"lightning-flows checkpoint; use another one from the run's checkpoints/ directory",
    "foreign": r".*foreign.ckpt is a torch file but not a lightning-flows model checkpoint \(no model class "
               r"recorded\); pass a checkpoint written by `lightning-flows fit`",
}


@pytest.mark.parametrize("kind", SAMPLE_AND_RESUME_ERRORS)
def test_sample_refuses_a_truncated_or_foreign_checkpoint(checkpoints, tmp_path, kind):
    with pytest.raises(SystemExit, match="^error: " + SAMPLE_AND_RESUME_ERRORS[kind]):
        main(["sample", "--ckpt", str(checkpoints[kind]), "--out", str(tmp_path / "x.png")])


@pytest.mark.parametrize("kind,message", [
    *SAMPLE_AND_RESUME_ERRORS.items(),
    ("gan", r".*gan.*last.ckpt was written by a GAN run, but this run trains FlowMatching; pass a checkpoint of the "
            r"same family and config to --ckpt_path, or drop --ckpt_path to start afresh"),
])
def test_ckpt_path_refuses_a_truncated_foreign_or_other_family_checkpoint(checkpoints, tmp_path, kind, message):
    with pytest.raises(SystemExit, match="^error: " + message):
        main(["fit", "--config", TOY, *QUIET, *_dirs(tmp_path), "--model.init_args.hidden", "32",
              "--trainer.max_steps", "4", "--ckpt_path", str(checkpoints[kind])])
    assert not list(tmp_path.glob("**/*.ckpt"))  # refused before any training


def test_ckpt_path_of_another_configuration_is_either_adopted_with_a_warning_or_refused(checkpoints, tmp_path):
    from lightning.pytorch.cli import LightningCLI

    hidden_32 = tmp_path / "hidden_32.yaml"  # a config file's option: the checkpoint's replaces it
    hidden_32.write_text("model:\n  init_args:\n    hidden: 32\n")
    args = ["fit", "--config", TOY, "--config", str(hidden_32), *QUIET, *_dirs(tmp_path),
            "--trainer.max_steps", "4", "--ckpt_path", str(checkpoints["fm16"])]
    if not hasattr(LightningCLI, "_parse_ckpt_path"):
        # Lightning < 2.5.5 builds the configured model; loading then refuses the other weights.
        with pytest.raises(SystemExit, match=r"^error: .*holds FlowMatching weights of another configuration"):
            main(args)
        return
    # Lightning >= 2.5.5 replaces the config's model options by the checkpoint's; we say which ones changed.
    with pytest.warns(UserWarning, match=r"the checkpoint's model options replace the config's, since its weights "
                                         r"need them: hidden=16 \(config: 32\)"):
        main(args)
    (last,) = tmp_path.glob("**/last.ckpt")
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 4 and saved["hyper_parameters"]["hidden"] == 16


def test_model_options_typed_on_the_command_line_win_over_the_checkpoint(checkpoints, tmp_path, monkeypatch):
    """`test --ckpt_path X --model.init_args.sampler.rtol 1e-6` must evaluate at 1e-6: Lightning's own adoption
    of the checkpoint's options drops what the user typed (Lightning-AI/pytorch-lightning#21455)."""
    from lightning_flows.training import FlowsCLI, build_cli

    monkeypatch.setattr(FlowsCLI, "_run_subcommand", lambda self, subcommand: None)  # the parsed model is the point
    quiet = QUIET[:-2]  # without its --model.init_args.sampler.steps 2
    cli = build_cli(["test", "--config", TOY, *quiet, *_dirs(tmp_path), "--ckpt_path", str(checkpoints["fm16"]),
                     "--model.init_args.sampler.method", "rk4", "--model.init_args.sampler.rtol=0.001",
                     "--model.init_args.lr", "0.5"])
    assert (cli.model.sampler.method, cli.model.sampler.rtol, cli.model.hparams.lr) == ("rk4", 0.001, 0.5)
    # the rest of the sampler and the architecture are still the checkpoint's: 2 steps and hidden 16 (the fixture
    # typed them), where the config file says 50 and 128
    assert cli.model.sampler.steps == 2 or not hasattr(FlowsCLI, "_parse_ckpt_path")
    assert cli.model.hparams.hidden == 16 or not hasattr(FlowsCLI, "_parse_ckpt_path")


def test_a_typed_model_option_the_checkpoints_weights_do_not_fit_is_refused(checkpoints, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: .*fm16.*last.ckpt holds FlowMatching weights of another "
                                         r"configuration \(velocity\.\S+: \(16, \d+\) in the file, \(32, \d+\) in "
                                         r"this model;.*a model option typed on the command line replaces"):
        main(["test", "--config", TOY, *QUIET, *_dirs(tmp_path), "--model.init_args.hidden", "32",
              "--ckpt_path", str(checkpoints["fm16"])])


def test_command_line_model_options_are_read_as_dotted_names_below_init_args():
    from lightning_flows.training import command_line_model_options

    args = ["fit", "--config", "x.yaml", "--model.init_args.sampler.rtol", "1e-6", "--model.hidden=32",
            "--model", "other.yaml", "--model.class_path", "X", "--data.batch_size", "4",
            "--model.dict_kwargs.sigma", "0.1"]
    assert command_line_model_options(args) == ["sampler.rtol", "hidden", "sigma"]


def test_resuming_a_model_of_another_configuration_from_python_names_the_mismatch(checkpoints):
    import lightning as L

    from lightning_flows.callbacks.checkpointing import RunCheckpoint
    from lightning_flows.checkpoints import CheckpointError
    from lightning_flows.models import FlowMatching

    trainer = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[RunCheckpoint(dirpath=str(checkpoints["fm"].parent / "py"))])
    with pytest.raises(CheckpointError, match=r".*last.ckpt holds FlowMatching weights of another configuration "
                                              r"\(velocity\.\S+: \(16, \d+\) in the file, \(32, \d+\) in "
                                              r"this model;.*\). Resume with the config and model options"):
        trainer.fit(FlowMatching((2,), hidden=32), GenerativeDataModule("8gaussians", batch_size=64),
                    ckpt_path=str(checkpoints["fm16"]))


def test_ckpt_path_accepts_its_own_checkpoint(checkpoints, tmp_path):
    main(["fit", "--config", TOY, *QUIET, *_dirs(tmp_path), "--model.init_args.hidden", "32",
          "--trainer.max_steps", "4", "--ckpt_path", str(checkpoints["fm"])])
    (last,) = tmp_path.glob("**/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 4  # resumed at 2, trained to 4


# ---- settings that would train nothing, or fail only after the run directory exists ----
@pytest.mark.parametrize("option,value,message", [
    ("--trainer.max_steps", "-5", r"--trainer.max_steps -5 is not a number of optimizer steps: pass how many optimizer "
                                  r"steps to train \(>= 1\), or -1 for no limit"),
    ("--trainer.max_steps", "0", r"--trainer.max_steps 0 would train nothing and save an untrained model: pass how "
                                 r"many optimizer steps to train \(>= 1\)"),
    ("--trainer.max_epochs", "0", r"--trainer.max_epochs 0 would train nothing"),
    ("--data.batch_size", "0", r"--data.batch_size 0: a batch holds at least one example; pass a batch size >= 1"),
    ("--data.batch_size", "-3", r"--data.batch_size -3: a batch holds at least one example"),
    ("--data.eval_batch_size", "0", r"--data.eval_batch_size 0: a batch holds at least one example"),
])
def test_a_setting_that_cannot_train_fails_before_the_run_directory_exists(tmp_path, option, value, message):
    root = tmp_path / "runs"
    with pytest.raises(SystemExit, match="^error: " + message):
        main(["fit", "--config", TOY, *QUIET, *_dirs(root), option, value])
    assert not root.exists()


def test_a_run_the_non_finite_guard_stops_exits_non_zero_and_keeps_last_ckpt(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", TOY, *QUIET, *_dirs(tmp_path), "--trainer.max_steps", "20",
              "--trainer.callbacks+=fault_injection.NaNGradients", "--trainer.callbacks.step", "2",
              "--non_finite_guard.max_consecutive", "3"])
    assert re.match(r"error: NonFiniteGuard: 3 consecutive optimizer steps had a NaN/inf loss or gradient \(global "
                    r"step \d+\); stopping. No bad update reached the weights.*Lower the learning rate",
                    str(info.value.code))
    (last,) = tmp_path.glob("**/last.ckpt")  # the last good weights, saved on the stop
    saved = torch.load(last, weights_only=True)
    assert all(value.isfinite().all() for value in saved["state_dict"].values())


# ---- lightning-flows sample ----
@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory):
    """A (untrained) class-conditional flow matching checkpoint on digits: enough to sample with guidance."""
    from lightning_flows.checkpoints import MODEL_CLASS_KEY, model_class_name
    from lightning_flows.models import FlowMatching

    model = FlowMatching((1, 8, 8), backbone="mlp", hidden=16, num_classes=10,
                         sampler={"method": "euler", "steps": 2})
    path = tmp_path_factory.mktemp("conditional") / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    torch.save({MODEL_CLASS_KEY: model_class_name(FlowMatching), "state_dict": model.state_dict(),
                "hyper_parameters": dict(model.hparams),
                "datamodule_hyper_parameters": {"dataset": "digits", "conditional": True}}, path)
    return path


def _sample_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(["sample", *args])
    assert info.value.code != 0
    return capsys.readouterr().err + (info.value.code if isinstance(info.value.code, str) else "")


@pytest.mark.parametrize("guidance", ["nan", "inf", "-inf"])
def test_sample_refuses_a_guidance_weight_that_is_not_finite(conditional_checkpoint, tmp_path, capsys, guidance):
    message = _sample_error(capsys, "--ckpt", str(conditional_checkpoint), f"--guidance={guidance}",
                            "--out", str(tmp_path / "x.png"))
    assert f"--guidance {float(guidance)} is not a finite number" in message and "Pass a finite w" in message
    assert not (tmp_path / "x.png").exists()


def test_negative_guidance_is_anti_guidance_and_says_so(conditional_checkpoint, tmp_path, capsys):
    main(["sample", "--ckpt", str(conditional_checkpoint), "--class", "3", "--guidance", "-5", "--n", "4",
          "--out", str(tmp_path / "away.png")])
    printed = capsys.readouterr().out
    assert f"wrote 4 samples to {tmp_path / 'away.png'}" in printed and "w=-5 < 0 steers away from the class" in printed
    assert (tmp_path / "away.png").is_file()


def test_sample_on_a_device_this_machine_lacks_says_so_not_corrupt(checkpoints, tmp_path, capsys):
    if not torch.cuda.is_available():
        message = _sample_error(capsys, "--ckpt", str(checkpoints["fm"]), "--device", "cuda")
        assert "--device cuda: torch sees no CUDA GPU on this machine" in message and "Use --device cpu" in message
        assert "corrupt" not in message
    message = _sample_error(capsys, "--ckpt", str(checkpoints["fm"]), "--device", "banana")
    assert "--device 'banana' is not a device name; use cpu, cuda, cuda:<index> or mps" in message


def test_sample_to_an_unwritable_place_fails_before_sampling(checkpoints, capsys):
    message = _sample_error(capsys, "--ckpt", str(checkpoints["fm"]), "--out", "/proc/nope/x.png")
    assert message.startswith("error: Cannot write to /proc/nope (") and "the samples cannot be saved there. " \
        "Pass a writable path with --out PATH.png (or --out DIR)." in message


def test_sample_out_a_directory_writes_into_it_and_reports_the_real_file(checkpoints, tmp_path, capsys):
    main(["sample", "--ckpt", str(checkpoints["fm"]), "--n", "8", "--out", str(tmp_path)])
    written = tmp_path / "sample_n8_seed0.png"  # the default name beside a run's checkpoints
    assert written.is_file() and f"wrote 8 samples to {written}" in capsys.readouterr().out
    main(["sample", "--ckpt", str(checkpoints["fm"]), "--n", "8", "--out", str(tmp_path / "grid")])
    assert (tmp_path / "grid.png").is_file() and f"to {tmp_path / 'grid.png'}" in capsys.readouterr().out


def test_a_directory_as_checkpoint_names_a_file_to_pass(checkpoints, tmp_path, capsys):
    run = checkpoints["fm"].parent.parent
    expected = rf"{run} is a directory, not a checkpoint file; pass one of the .ckpt files of a run's checkpoints/ " \
               rf"directory, e.g. {checkpoints['fm']}"
    assert _sample_error(capsys, "--ckpt", str(run)).startswith("error: " + expected)
    with pytest.raises(SystemExit, match="^error: " + re.escape(expected)):
        main(["fit", "--config", TOY, *QUIET, *_dirs(tmp_path), "--ckpt_path", str(run)])


# ---- checkpoints whose fields have the wrong types, or plain-data objects ----
def _edited(source, target, **changes):
    checkpoint = torch.load(source, weights_only=True)
    checkpoint.update(changes)
    torch.save(checkpoint, target)
    return target


def test_hyper_parameters_that_are_a_list_are_refused_by_fit_and_sample(checkpoints, tmp_path, capsys):
    odd = _edited(checkpoints["fm"], tmp_path / "list.ckpt", hyper_parameters=[1, 2])
    expected = rf"{odd}: its 'hyper_parameters' is a list, not the dict of options a lightning-flows checkpoint " \
               rf"holds; the file was edited or written by another program"
    assert expected in _sample_error(capsys, "--ckpt", str(odd))
    with pytest.raises(SystemExit, match="^error: " + re.escape(expected)):
        main(["fit", "--config", TOY, *QUIET, *_dirs(tmp_path / "runs"), "--ckpt_path", str(odd)])
    assert not list((tmp_path / "runs").glob("**/*.ckpt"))


def test_a_solver_config_object_in_hyper_parameters_resumes_and_samples(checkpoints, tmp_path, capsys):
    """A model built in Python (``sampler=SolverConfig(...)``) pickles the dataclass into its hyperparameters."""
    source = torch.load(checkpoints["fm"], weights_only=True)
    hparams = {**source["hyper_parameters"], "sampler": SolverConfig(method="euler", steps=3)}
    pythonic = _edited(checkpoints["fm"], tmp_path / "pythonic.ckpt", hyper_parameters=hparams)
    main(["fit", "--config", TOY, *QUIET, *_dirs(tmp_path / "runs"), "--model.init_args.hidden", "32",
          "--trainer.max_steps", "3", "--ckpt_path", str(pythonic)])
    (last,) = (tmp_path / "runs").glob("**/last.ckpt")
    resumed = torch.load(last, weights_only=True)
    # the pickled dataclass's method (the config file says midpoint), the steps QUIET types on the command line
    assert resumed["global_step"] == 3 and resumed["hyper_parameters"]["sampler"]["method"] == "euler"
    assert resumed["hyper_parameters"]["sampler"]["steps"] == 2
    main(["sample", "--ckpt", str(pythonic), "--n", "8", "--out", str(tmp_path / "s.png")])
    assert "wrote 8 samples" in capsys.readouterr().out and (tmp_path / "s.png").is_file()


# ---- errors of the command-line parser stay visible ----
def test_a_malformed_config_file_names_the_file_and_line_in_a_few_lines(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_steps: [1\nmodel:\n")
    message = _fit_error(capsys, "--config", TOY, "--config", str(broken), *_dirs(tmp_path))
    assert re.search(rf"error: Config file {re.escape(str(broken))} is not valid YAML: .* at line 3, column \d+\. "
                     rf"Fix the file there", message)
    assert len(message.strip().splitlines()) <= 4, message  # not ~115 lines of usage above it
    assert not (tmp_path / "toy2d_flow_matching").exists()


def test_an_unknown_key_is_reported_in_a_few_lines(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("trainer:\n  max_stepz: 3\n")
    message = _fit_error(capsys, "--config", TOY, "--config", str(config), *_dirs(tmp_path))
    assert len(message.strip().splitlines()) <= 5, message
    assert message.strip().splitlines()[-1].startswith("Unknown option --trainer.max_stepz. Did you mean")
