"""``esft report``: PNG plots and one self-contained HTML page from run folders and analysis JSON.

The report only reads files (``config.yaml``, ``metrics.jsonl``, ``eval.jsonl`` and the JSON that
``esft analyze`` writes); it never imports the trainers and never loads a model.

- ``collect``: run folders and analysis files -> plain data (runs, seed groups, analyses by kind);
- ``plots``: one function per plot (matplotlib, Agg), each writing a PNG and saying what it drew;
- ``page``: the HTML page (PNGs as data URIs, inline CSS, configs side by side, cost table);
- ``cli``: the ``esft report`` command. See ``docs/report.md``.
"""
