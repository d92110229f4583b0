"""Every kind of source, in the order a source string is tried: the first kind that finds it opens it.

Order matters only where two kinds could claim one string: `builtin:` and `karpathy+all:` names
before paths, directory layouts from the most specific to the most general, and a hub id last
(for a string that is no local path). Adding a source: one module holding a `SourceKind`, and
one line here.
"""

from __future__ import annotations

from pg_finetune.data import builtin, hub, imagefolder, jsonl, karpathy, saved
from pg_finetune.data.source import Request, Source, SourceKind

SOURCES: list[SourceKind] = [
    builtin.BUILTIN,
    jsonl.FILE,
    karpathy.KARPATHY,
    saved.SAVED,
    hub.REPOSITORY,
    jsonl.DIRECTORY,
    imagefolder.IMAGEFOLDER,
    hub.DATA_FILES,
    hub.HUB,
]


def open_source(request: Request) -> Source:
    """The `Source` for one split of `request.source`; if no kind claims it, an error listing what would do."""
    for kind in SOURCES:
        found = kind.find(request)
        if found is not None:
            if request.config is not None and not kind.takes_config:
                # a silently ignored configuration name would train on data the user did not pick
                takes = " or ".join(k.description for k in SOURCES if k.takes_config)
                raise ValueError(
                    f"{request.source!r} is a {kind.name} source ({kind.description}), which has no dataset "
                    f"configurations, but configuration {request.config!r} was asked for (data.train_config / "
                    f"data.eval_config, or pg-eval's --config): remove it. Configurations apply only to {takes}"
                )
            return kind.open(found, request)
    if request.path.is_dir():
        expected = "\n".join(f"  - {kind.description}" for kind in SOURCES if kind.form == "directory")
        found = sorted(set().union(*(kind.splits(request.path) for kind in SOURCES if kind.splits)))
        found_here = (
            f"\nsplits found here: {', '.join(found)} (name one in data.train_split / data.eval_split, or --split)"
            if found else ""
        )  # fmt: skip
        raise ValueError(
            f"cannot read directory {request.source!r} for split {request.split!r}; "
            f"expected one of:\n{expected}{found_here}"
        )
    expected = " or ".join(kind.description for kind in SOURCES if kind.form == "file")
    raise ValueError(f"cannot read {request.source!r}: a file source must be {expected}")
