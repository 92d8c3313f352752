"""One resolver for built-in names and user code: ``"module:attribute"`` references.

A job names its model, dataset, loss and algorithm either by a built-in name or by a reference
in the entry-point convention, ``"mylab.nets:build"``. Built-in names are nothing but references
into hpcfed (the tables below), so the engine never branches on them and user code goes through
the same door. The config checks the *shape* of a value when the job is loaded
(:func:`check_name`); :func:`resolve` imports the *target* at start-up, on every rank, and turns
every way it can fail into a :class:`UserError` naming the key.

User modules are imported from ``sys.path`` plus the job file's folder (``job_dir``, prepended,
as Python does for a script's folder). Each resolved user module is recorded with its file and the
SHA-256 of its source (:func:`user_code`), so checkpoints can say when the code changed.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcfed.errors import UserError


@dataclass(frozen=True)
class Builtin:
    target: str  # "module:attribute" inside hpcfed
    # The built-in's own keys of its table (model.hidden, data.path, ...), passed to the target as
    # keyword options beside model.options/data.options: the job files of before the registry
    # keep working unchanged. User targets get only the options table.
    keys: tuple[str, ...] = ()


BUILTINS: dict[str, dict[str, Builtin]] = {
    "model.name": {
        "mlp": Builtin("hpcfed.models.mlp:build", ("hidden",)),
        "cnn": Builtin("hpcfed.models.cnn:build_cnn"),
        "resnet8": Builtin("hpcfed.models.resnet:build_resnet8", ("norm",)),
        "resnet18": Builtin("hpcfed.models.resnet:build_resnet18", ("norm",)),
        "elastic_mlp": Builtin("hpcfed.models.elastic:build_elastic_mlp", ("hidden", "subnet")),
        "elastic_resnet": Builtin(
            "hpcfed.models.elastic:build_elastic_resnet", ("channels", "blocks", "norm", "subnet")
        ),
        "char_lstm": Builtin("hpcfed.models.char:build_char_lstm"),
        "char_transformer": Builtin("hpcfed.models.char:build_char_transformer"),
    },
    "data.dataset": {
        "digits": Builtin("hpcfed.data.digits:load_federated"),
        "synthetic": Builtin(
            "hpcfed.data.synthetic:load_federated",
            ("num_clients", "synthetic_alpha", "synthetic_beta"),
        ),
        "h5": Builtin("hpcfed.data.h5:load_federated", ("path", "test_path", "num_clients", "partition")),
        "mnist": Builtin("hpcfed.data.torchvision_local:load_mnist_federated", ("path",)),
        "cifar10": Builtin("hpcfed.data.torchvision_local:load_cifar10_federated", ("path",)),
        "leaf": Builtin("hpcfed.data.leaf:load_federated", ("path", "test_path", "num_clients", "partition")),
        "fed_shakespeare": Builtin(
            "hpcfed.data.text:load_fed_shakespeare", ("path", "test_path", "num_clients", "partition")
        ),
        "pfl": Builtin("hpcfed.data.text:load_pfl", ("path", "test_path", "num_clients", "partition")),
    },
    "train.loss": {
        "cross_entropy": Builtin("hpcfed.losses:cross_entropy"),
        "mse": Builtin("hpcfed.losses:mse"),
    },
    "algorithm": {
        "fedavg": Builtin("hpcfed.algorithms.fedavg:FedAvg"),
        "fedprox": Builtin("hpcfed.algorithms.fedprox:FedProx"),
        "scaffold": Builtin("hpcfed.algorithms.scaffold:Scaffold"),
        "fednova": Builtin("hpcfed.algorithms.fednova:FedNova"),
        "fedpt": Builtin("hpcfed.algorithms.fedpt:FedPT"),
        "prism": Builtin("hpcfed.algorithms.prism:Prism"),
        "resfed": Builtin("hpcfed.algorithms.resfed:ResFed"),
        "hadfl": Builtin("hpcfed.algorithms.hadfl:HADFL"),
        "superfed": Builtin("hpcfed.algorithms.superfed:SuperFed"),
    },
}

_REFERENCE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_reference(value: str) -> bool:
    """``"pkg.mod:attr"`` (the attribute may be dotted: ``"pkg.mod:Class.method"``)."""
    return bool(_REFERENCE.match(value))


def builtin(key: str, value: str) -> Builtin | None:
    return BUILTINS[key].get(value)


def check_name(key: str, value: str) -> str:
    """At load: ``value`` is a built-in name for ``key`` or has the shape of a reference."""
    if value in BUILTINS[key] or is_reference(value):
        return value
    names = ", ".join(BUILTINS[key])
    raise ValueError(
        f"unknown {key.split('.')[-1]} {value!r}; expected one of {names}, or 'module:attribute'"
    )


def call_options(key: str, value: str, table: str, cfg, options: dict[str, Any]) -> dict[str, Any]:
    """The keyword options a target named by ``key = value`` is called with: a built-in's own
    keys of its table (``cfg``'s attributes, e.g. model.hidden), then the ``options`` table; a key
    in both is a UserError (one way to set a thing)."""
    entry = builtin(key, value)
    own = {k: getattr(cfg, k) for k in (entry.keys if entry else ())}
    for k in options:
        if k in own:
            raise UserError(f"{table}.options.{k}: set {table}.{k} instead (a key of the built-in {value!r})")
    return {**own, **options}


# --------------------------------------------------------------------------- import


def add_search_path(folder: str | Path | None) -> None:
    """Put a job's folder first on ``sys.path`` (once), where its user modules are found."""
    if folder is None:
        return
    folder = str(Path(folder).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)


_RESOLVED: dict[str, Any] = {}  # reference -> object (a user module is imported once per process)
_USER_MODULES: dict[str, str] = {}  # reference -> its module's name, for user references


def resolve(key: str, value: str) -> Any:
    """The object ``value`` names for ``key`` (a built-in name or a reference): UserError naming
    the key if the module does not import or has no such attribute."""
    entry = builtin(key, value)
    reference = entry.target if entry is not None else value
    if reference in _RESOLVED:
        return _RESOLVED[reference]
    if not is_reference(reference):
        raise UserError(f"{key} = {value!r}: expected a built-in name or 'module:attribute'")
    module_name, _, attr_path = reference.partition(":")
    if module_name == "__main__":
        module = sys.modules.get("__main__")
        if module is None or not _has_path(module, attr_path):
            raise UserError(
                f"{key} = {value!r}: defined in the launching script (__main__), which is not this one; "
                "a run with user code from __main__ runs and resumes only from a Python script that "
                "defines it (hpcfed.run / hpcfed.resume), not from the hpcfed command"
            )
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                raise UserError(
                    f"{key} = {value!r}: no module named {exc.name!r} on sys.path or in the job's folder"
                ) from None
            raise UserError(
                f"{key} = {value!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - the user's module raised while importing
            raise UserError(
                f"{key} = {value!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
            ) from None
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{key} = {value!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    _RESOLVED[reference] = obj
    if entry is None and not _is_hpcfed(module_name):  # hpcfed's own modules are not user code
        _USER_MODULES[reference] = module_name
    return obj


def _is_hpcfed(module_name: str) -> bool:
    return module_name == "hpcfed" or module_name.startswith("hpcfed.")


def _has_path(obj: Any, attr_path: str) -> bool:
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def resolve_callable(key: str, value: str) -> Any:
    target = resolve(key, value)
    if not callable(target):
        raise UserError(
            f"{key} = {value!r}: {type(target).__name__} object is not callable; expected a function"
        )
    return target


def forget_user_code() -> None:
    """Forget every user resolution and unload the user modules, so the next resolve imports
    them afresh (one process running jobs whose folders hold different modules of one name)."""
    for reference, module in list(_USER_MODULES.items()):
        _RESOLVED.pop(reference, None)
        top = module.split(".")[0]
        if top == "__main__" or _is_hpcfed(top):
            continue
        for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            del sys.modules[name]
    _USER_MODULES.clear()


def user_code(references: dict[str, str]) -> dict[str, dict[str, str]]:
    """``{key: {"reference", "file", "sha256"}}`` for the user references among ``references``
    (``{key: value}``, already resolved): what a checkpoint records to notice edited code."""
    out = {}
    for key, value in references.items():
        if builtin(key, value) is not None or value not in _USER_MODULES:
            continue
        module = sys.modules.get(_USER_MODULES[value])
        path = getattr(module, "__file__", None)
        digest = ""
        if path and Path(path).is_file():
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        out[key] = {"reference": value, "file": str(path or "<unknown>"), "sha256": digest}
    return out


def changed_code(recorded: dict[str, dict[str, str]], current: dict[str, dict[str, str]]) -> list[str]:
    """Files whose source differs from what a checkpoint recorded (resume warns about each)."""
    changed = []
    for key, then in recorded.items():
        now = current.get(key)
        if now is None or now["sha256"] != then.get("sha256") or now["file"] != then.get("file"):
            changed.append(f"{then.get('file')} ({key} = {then.get('reference')!r})")
    return changed
