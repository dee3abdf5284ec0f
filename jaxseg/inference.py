"""Loading a trained model (a workdir's checkpoint or the pretrained one) and applying it."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import pathlib
import re
import shutil
import stat

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxseg import checkpointing, losses, train_step
from jaxseg.workdir import write_text_whole
from jaxseg.models import create_model, of_members

PRETRAINED_DIR = pathlib.Path(__file__).resolve().parent / "pretrained"
PRETRAINED_WEIGHTS = "weights"
MODEL_CARD = "model_card.json"


class MembersError(ValueError):
    """A member count the model cannot give (a ValueError of its own, so that command lines
    blame --members for it and for nothing else)."""


def person_probabilities(model, images: jax.Array, *, flip_tta: bool = False) -> jax.Array:
    """(B, S, S) P(person) from uint8 images in inference mode, optionally averaged with the mirror."""
    probs = losses.person_probability(model(images, train=False))
    if flip_tta:
        flipped = losses.person_probability(model(images[:, :, ::-1], train=False))
        probs = (probs + flipped[:, :, ::-1]) / 2
    return probs


# Config fields added after runs were stored, with the value those runs had: filled in where
# absent, so that an older checkpoint or card builds, compares and ensembles like a new one.
_ADDED_FIELDS = {"model": {"attention_gates": False, "output_shift": (0.0, 0.0)}}


def config_from_json(text: str | dict) -> ml_collections.ConfigDict:
    """A ConfigDict from the JSON stored with checkpoints and model cards."""
    data = copy.deepcopy(json.loads(text) if isinstance(text, str) else text)
    for section, fields in _ADDED_FIELDS.items():
        if isinstance(data.get(section), dict):
            for name, value in fields.items():
                data[section].setdefault(name, value)
    return ml_collections.ConfigDict(data)


def load_pretrained(directory: str | pathlib.Path | None = None, members: int = 0):
    """(model, config, card) of the pretrained model stored in the repository (or `directory`).

    A card listing several `member_weights` is an ensemble: the model is their LogitAverage,
    or that of the first `members` of them (0 = all).
    """
    directory = pathlib.Path(directory or PRETRAINED_DIR)
    card_path = directory / MODEL_CARD
    if not card_path.exists():
        raise FileNotFoundError(
            f"no pretrained model at {directory}: pass --workdir with a trained run instead")
    card = json.loads(card_path.read_text())
    config = config_from_json(card["config"])
    names = card.get("member_weights", [PRETRAINED_WEIGHTS])
    if not 0 <= members <= len(names):
        raise MembersError(f"the pretrained model has {len(names)} members "
                         f"(use 1..{len(names)}, or 0 for all)")
    # Shapes only: initialising real weights that the restore overwrites costs seconds.
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create_model(config.model)))
    models = []
    # Closed after, as after saving: an orbax checkpointer holds a metadata store to release.
    with ocp.StandardCheckpointer() as checkpointer:
        for name in names[:members or len(names)]:
            path = (directory / name).absolute()
            # A copy with files lost or cut short: one line, not orbax's traceback.
            with checkpointing.damage_said(
                    f"pretrained weights {path}", "the copy is damaged: restore it (git checkout "
                    f"-- {path}), or pass --workdir with a trained run"):
                models.append(nnx.merge(graphdef, checkpointer.restore(path, abstract)))
    return of_members(models), config, card


def save_pretrained(models, config, card: dict, directory: str | pathlib.Path = PRETRAINED_DIR):
    """Writes one model, or an ensemble's member models, and the card to `directory`.

    Each member's inference state is its own orbax checkpoint (no pickle): `weights`, then
    `weights_1`, `weights_2`, ...; the card's `member_weights` lists them in order. Members of a
    larger ensemble saved there before are removed, so the folder holds only what the card names.
    """
    models = models if isinstance(models, (list, tuple)) else [models]
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    names = [PRETRAINED_WEIGHTS] + [f"{PRETRAINED_WEIGHTS}_{i}" for i in range(1, len(models))]
    # Closing waits for the saves and releases the checkpointer's metadata store (its thread).
    with ocp.StandardCheckpointer() as checkpointer:
        for name, model in zip(names, models):
            checkpointer.save(directory / name, nnx.state(model), force=True)
    card = dict(card, config=json.loads(config.to_json()))
    card.pop("member_weights", None)  # a card taken from an ensemble must not name absent members
    if len(models) > 1:
        card["member_weights"] = names
    write_text_whole(directory / MODEL_CARD, json.dumps(card, indent=2) + "\n")
    # After the card: a kill in between leaves unnamed folders, not a card naming missing ones.
    for stale in directory.glob(f"{PRETRAINED_WEIGHTS}_*"):
        if (stale.name not in names and stale.is_dir() and not stale.is_symlink()
                and re.fullmatch(rf"{PRETRAINED_WEIGHTS}_\d+", stale.name)):
            shutil.rmtree(stale)


def load_from_workdir(workdir: str, checkpoint: str = "best"):
    """(model, config, step) from a training workdir's 'best', 'latest' or numbered checkpoint,
    placed on the default device."""
    ckpts = checkpointing.Checkpoints(workdir, read_only=True)
    meta, _ = ckpts.read_meta(checkpoint)
    config = config_from_json(meta["config"])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    graphdef, abstract = nnx.eval_shape(lambda: train_step.create_train_state(config))
    # That model's weights alone: the whole train state (the optimizer's moments, the other
    # model) took 3 to 4 times their memory and reading time.
    node = train_step.inference_node(config)
    nodes, step = ckpts.restore_nodes(checkpoint, checkpointing.abstract_like(abstract, device),
                                      (node,))
    ckpts.close()
    # Its structure from the train state's shapes, not from a second trace of the model.
    model_graphdef = nnx.graphdef(nnx.merge(graphdef, abstract)[node])
    return nnx.merge(model_graphdef, nodes[node]), config, step


def weights_digest(model) -> str:
    """sha256 of MODEL's weights, as hex: processes compare it to know they hold the same model."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(nnx.state(model))):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def load(workdir: str | None = None, checkpoint: str = "best", members: int = 0):
    """(model, config, description): a workdir's checkpoint, else the pretrained model.

    `members` > 0 keeps the first that many of a pretrained ensemble; a workdir holds one model.
    """
    if workdir:
        if members:
            raise MembersError("members applies to the pretrained model; a workdir holds one model")
        model, config, step = load_from_workdir(workdir, checkpoint)
        return model, config, {"source": str(workdir), "checkpoint_step": step}
    model, config, card = load_pretrained(members=members)
    return model, config, {"source": "pretrained",
                           "checkpoint_step": member_steps(card.get("steps"), members)}


def member_steps(steps, members: int | None):
    """The checkpoint step recorded for the first `members` (0 or None = all) of a model whose
    card lists STEPS: an ensemble's list is cut to them, and one step stands alone."""
    if not isinstance(steps, list):
        return steps
    kept = steps[:members or len(steps)]
    return kept[0] if len(kept) == 1 else kept


def checkpoint_problem(workdir: str | None, checkpoint: str) -> str | None:
    """Why a command line's --workdir and --checkpoint cannot apply (a checkpoint that is no
    checkpoint's name, a workdir that is no folder, a checkpoint other than 'best' without a
    workdir), or None."""
    from jaxseg.workdir import is_storage_url, workdir_path

    # Else report took a mistyped name for a workdir without checkpoints and went on without its
    # overlays, exit status 0.
    if problem := checkpointing.name_problem(checkpoint):
        return f"--checkpoint {checkpoint}: {problem}"
    if workdir:
        path = workdir_path(workdir)
        local = not is_storage_url(workdir)
        try:
            # Not epath's is_dir (os.path.isdir): that says False, "no such folder", of a folder
            # in another user's home, where looking is not allowed.
            is_dir = stat.S_ISDIR(pathlib.Path(path).stat().st_mode) if local else path.is_dir()
        except (FileNotFoundError, NotADirectoryError):
            is_dir = False
        except OSError as e:
            return f"--workdir {workdir}: cannot reach it ({e.strerror})"
        if not is_dir:
            return f"--workdir {workdir}: no such folder"
        # A folder that may not be listed or entered has, to orbax, no checkpoints in it.
        if local and not os.access(path, os.R_OK | os.X_OK):
            return f"--workdir {workdir}: cannot read it (Permission denied)"
    if not workdir and checkpoint != "best":
        return (f"--checkpoint {checkpoint} needs --workdir: the pretrained model has one set of "
                "weights")
    return None


def load_or_exit(workdir: str | None = None, checkpoint: str = "best", members: int = 0):
    """load() for command lines: a missing model or checkpoint, or a member count the model
    cannot give, ends the program with its message instead of a traceback."""
    from jaxseg import distributed

    problem = checkpoint_problem(workdir, checkpoint)
    if problem:
        distributed.exit_with_error(f"error: {problem}")
    try:
        return load(workdir, checkpoint, members)
    except MembersError as e:
        distributed.exit_with_error(f"error: --members {members}: {e}")
    except checkpointing.UnreadableCheckpoint as e:
        distributed.exit_with_error(f"error: {e}{': ' + e.elsewhere if e.elsewhere else ''}")
    except FileNotFoundError as e:
        distributed.exit_with_error(f"error: {e}")
