"""What a training run can check before its first step, so that a problem is found in seconds, not after training:
write access to the repos it will push to, and the disk one checkpoint needs. `job.build_job` collects these with
the data, model and output-dir checks and reports every problem at once (errors.Problems)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from huggingface_hub import get_token
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.errors import HfHubHTTPError

from hubtune import hub_calls
from hubtune.errors import DiskFullError, HubtuneError, PushError
from hubtune.files import nearest_existing
from hubtune.hub import PushTarget, api

# optimizer state tensors per trainable parameter (timm's optimizers); others keep two, as Adam does
OPTIMIZER_SLOTS = {"sgd": 1, "momentum": 1, "lion": 1, "rmsprop": 1, "adan": 3}


def write_access(target: PushTarget | None, hub_checkpoints: bool = False) -> list[HubtuneError]:
    """Why the token cannot push to `target` (--push-to-hub, and its --hub-checkpoints branch): no token, an invalid
    or read-only one, a namespace that is neither the user's nor one of their orgs', or a Hub that does not answer.
    None: the run pushes nothing."""
    if target is None:
        return []
    repo = target.repo_id
    flags = f"--push-to-hub {repo!r}" + (" with --hub-checkpoints" if hub_checkpoints else "")
    later = "or drop --push-to-hub and push the finished run with `hubtune push OUTPUT_DIR REPO`"
    if is_offline_mode():
        return [PushError(f"{flags}: HF_HUB_OFFLINE is set, so nothing can reach the Hub; unset it, {later}")]
    token = get_token() if target.token is None else target.token or None
    if token is None:
        return [PushError(f"{flags}: no Hub token, so the push would fail after training; run `hf auth login` or set "
                          f"HF_TOKEN to a token that can write to {repo.split('/')[0]!r}, {later}")]
    try:
        with hub_calls.answered(f"{flags}: checking the token"):
            who = api(token).whoami()
    except HfHubHTTPError as err:
        status = hub_calls.status_of(err)
        if status == 401:
            return [PushError(f"{flags}: the Hub refuses the token (401: invalid or expired); log in again with "
                              f"`hf auth login` or set HF_TOKEN to a valid write token, {later}")]
        return [PushError(f"{flags}: the Hub answered {status} when asked whose the token is "
                          f"({str(err).splitlines()[0]}); check HF_ENDPOINT and the token, {later}")]
    except HubtuneError as err:
        return [err]
    user = who.get("name", "?")
    role = (who.get("auth") or {}).get("accessToken", {}).get("role")
    if role == "read":
        return [PushError(f"{flags}: the token of user {user!r} is read-only; use a write token (HF_TOKEN or "
                          f"`hf auth login`), {later}")]
    namespace = repo.split("/")[0] if "/" in repo else user  # a bare name is created in the token's namespace
    writable = [user] + [o.get("name") for o in who.get("orgs") or [] if o.get("roleInOrg") not in ("read",)]
    # a fine-grained token's scopes are not listed; the Hub's namespaces ignore case
    if role != "fineGrained" and namespace.lower() not in {str(w).lower() for w in writable}:
        return [PushError(f"{flags}: user {user!r} cannot create or write repos in {namespace!r} (they can in: "
                          f"{', '.join(map(repr, writable))}); push to one of those, or use a token of {namespace!r}")]
    return []


def checkpoint_bytes(net: torch.nn.Module, optimizer: str, ema: bool) -> int:
    """About how many bytes one checkpoint of this model takes: weights, optimizer state, EMA copy."""
    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    trainable = sum(p.numel() * 4 for p in net.parameters() if p.requires_grad)  # optimizer state is fp32
    return weights * (2 if ema else 1) + trainable * OPTIMIZER_SLOTS.get(optimizer, 2)


def disk_room(out: Path, needed: int) -> list[HubtuneError]:
    """A DiskFullError when the disk of --output-dir has less free space than `needed` (one checkpoint)."""
    free = shutil.disk_usage(nearest_existing(out.resolve())).free
    if free >= needed:
        return []
    return [DiskFullError(f"--output-dir {str(out)!r}: {free / 2**20:.1f} MiB free on its disk, one checkpoint of "
                          f"this run needs about {needed / 2**20:.1f} MiB; free some space or give an --output-dir "
                          "on another disk")]
