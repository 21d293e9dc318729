"""Uploading adapters to the Hugging Face Hub: ``OrthoModel.push_to_hub``, with transformers' arguments.

    model.push_to_hub("user/my-oft-adapter", private=True)

The adapters are saved into a temporary directory by ``save_pretrained`` (safetensors, ``adapter_config.json``,
the model card) and uploaded in one commit with ``huggingface_hub.HfApi.upload_folder``. A model card already in
the repository is downloaded first and updated, as ``save_pretrained`` updates a local one, so its text is kept.

This module imports ``huggingface_hub`` only when called; ``import orthotune`` does not need it.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any

from orthotune.model_card import CARD_NAME, update_model_card

if TYPE_CHECKING:
    from orthotune.model import OrthoModel

__all__ = ["push_to_hub"]


def push_to_hub(
    model: OrthoModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = None,
    tags: list[str] | None = None,
    **save_kwargs: Any,
) -> Any:
    """Save ``model``'s adapters and upload them to the Hub repository ``repo_id`` (created if missing).

    Args:
        model: the adapted model.
        repo_id: ``"user/name"`` or ``"org/name"``.
        commit_message, commit_description: of the upload commit (default message ``"Upload model"``).
        private: make a new repository private (an existing one keeps its visibility).
        token: the Hub token (default: the one saved by ``hf auth login``).
        revision: the branch to push to (created if missing).
        create_pr: open a pull request instead of committing.
        max_shard_size: accepted for transformers' sake; adapter files are never sharded.
        tags: tags added to the model card's metadata.
        save_kwargs: passed to ``save_pretrained`` (``selected_adapters``, ``save_embedding_layers``, …).

    Returns:
        ``huggingface_hub``'s ``CommitInfo`` of the upload.

    Raises:
        ImportError: ``huggingface_hub`` is not installed.
        RuntimeError: the Hub could not be reached or refused to create the repository.
    """
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError
    except ImportError as error:
        raise ImportError(
            "push_to_hub needs huggingface_hub: `pip install huggingface_hub`; or save_pretrained(directory) and "
            "upload the directory yourself"
        ) from error
    api = HfApi()
    try:
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    except Exception as error:  # the Hub client raises its own errors and its HTTP library's
        raise RuntimeError(
            f"push_to_hub could not create or reach the Hub repository {repo_id!r} ({type(error).__name__}: "
            f"{error}); check the network connection and the token (`hf auth login`), or save_pretrained(directory) "
            "now and upload it later"
        ) from error
    with tempfile.TemporaryDirectory() as directory:
        try:
            existing = api.hf_hub_download(repo_id, CARD_NAME, revision=revision, token=token)
        except (EntryNotFoundError, RevisionNotFoundError):
            existing = None
        if isinstance(existing, str):
            with (
                open(existing, encoding="utf-8") as source,
                open(os.path.join(directory, CARD_NAME), "w", encoding="utf-8") as copy,
            ):
                copy.write(source.read())
        model.save_pretrained(directory, **save_kwargs)
        if tags:
            update_model_card(directory, model, tags=tags)
        if revision is not None and not create_pr and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=directory,
            commit_message=commit_message or "Upload model",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
