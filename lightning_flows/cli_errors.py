"""Command-line errors that name the fix: the closest valid option, the model families to choose from.

jsonargparse reports an unknown option or model class accurately but leaves the user to find the right
spelling in ``--help``. :class:`FlowsArgumentParser` appends a hint to those messages; everything else
(usage, exit status 2) is jsonargparse's.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import sys

from lightning.pytorch.cli import LightningArgumentParser


def model_families() -> list[str]:
    """Short names of every family ``--model`` accepts."""
    from lightning_flows.checkpoints import allowed_model_classes

    return sorted(name for name in allowed_model_classes() if "." not in name)


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every ``--option`` of ``parser`` and of its subcommands."""
    options = set()
    for action in parser._actions:
        options.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                options |= _option_strings(subparser)
    return options


def _init_parameters(class_path: str) -> list[str]:
    """The init options of the class jsonargparse was validating. Only a module already imported is read (it
    imported the class to validate it): an error message never makes us import what a config file names."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(sys.modules[module_name], name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except (KeyError, AttributeError, ValueError, TypeError):
        return []


def _did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def hint_for(message: str, parser: argparse.ArgumentParser) -> str:
    """Lines to append to jsonargparse's ``message`` (empty when there is nothing to add)."""
    if 'Parser key "model"' in message and re.search(r"dot import path|has no attribute|does not exist|"
                                                      r"Import path", message):
        # The value the user gave, as the different jsonargparse versions quote it.
        given = re.search(r"Given value: (?:NestedArg\(key='class_path', val=')?'?([\w.]+)|"
                          r"dot import path string: ([\w.]+)|has no attribute '(\w+)'", message)
        word = next((g for g in given.groups() if g), "").rpartition(".")[2] if given else ""
        families = model_families()
        return (f"\nChoose a model family: {', '.join(families)} (e.g. --model FlowMatching or "
                f"model.class_path: lightning_flows.models.FlowMatching).{_did_you_mean(word, families)}")
    hints = []
    # (The wordings of the jsonargparse versions we support.)
    key_rejected = r"(?:Option '(\w+)' is not accepted|No action for key \"(\w+)\"|Key '(\w+)' is not expected)"
    for class_path, *options in re.findall(r"class_path '([\w.]+)':\s*(?:Validation failed: )?" + key_rejected,
                                           message):
        option = next(o for o in options if o)
        parameters = _init_parameters(class_path)
        hints.append(f"{class_path.rpartition('.')[2]} has no option {option!r}.{_did_you_mean(option, parameters)}"
                     f" Its options: {', '.join(parameters)}.")
    unknown = re.findall(r"(?i)unrecognized arguments: (--[\w.]+)", message)
    unknown += ["--" + key for key in re.findall(r"does not accept (?:option|nested key) '([\w.]+)'", message)]
    unknown += ["--" + key for key in re.findall(r"^Validation failed: No action for key \"([\w.]+)\"", message)]
    if unknown:
        options = _option_strings(parser)
        for option in unknown:
            hint = _did_you_mean(option, options)
            hints.append(f"Unknown option {option}.{hint or ' See --help for the accepted options.'}")
    return ("\n" + "\n".join(hints)) if hints else ""


class FlowsArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, with :func:`hint_for` appended to its error messages and a one-line usage above
    them (jsonargparse's lists every option, ~115 lines that bury the reason; ``--help`` still lists them)."""

    def error(self, message: str, ex: Exception | None = None):
        return super().error(message + hint_for(message, self), ex)

    def print_usage(self, file=None) -> None:
        (file or sys.stdout).write(f"usage: {self.prog.replace(' [options]', '')} [options]\n")


def config_file_problem(args: list[str]) -> str | None:
    """Why a ``--config`` / ``-c`` file among ``args`` cannot be read as YAML (file, line, column, reason), or None.

    jsonargparse's own message names neither the file nor the line in it (``in "<unicode string>"``).
    """
    import yaml

    paths = [value for option, value in zip(args, args[1:]) if option in ("--config", "-c")]
    paths += [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                yaml.safe_load(handle)
        except OSError:
            continue  # jsonargparse says the file does not exist
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            return f"Config file {path} is not valid YAML: {problem}{where}. Fix the file there and rerun."
    return None


def model_error_of(message: str) -> str | None:
    """The model's (or DataModule's) own message inside jsonargparse's report of a failed Union.

    jsonargparse lists one error per subtype it tried (``None`` and the model class); the one that
    is not about ``None`` is the model's ValueError, which names the fix.
    """
    block = re.search(r"Errors:\n(.*?)(?:\nGiven value|\Z)", message, re.S)
    if block is None:
        return None
    errors = [e.strip() for e in re.split(r"\n\s*- ", "\n" + block.group(1)) if e.strip()]
    errors = [e for e in errors if not e.startswith("Expected a <class 'NoneType'>")]
    return errors[0] if len(errors) == 1 else None
