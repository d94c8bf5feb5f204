"""A reward for ``esft train --task custom --data examples/questions.jsonl --reward examples/number_reward.py:answers_with_number``.

Columns of the data file (here ``min_value``) arrive as keyword arguments, one value per completion.
"""

import re


def answers_with_number(prompts, completions, min_value, **kwargs) -> list[float]:
    """1.0 when the completion starts with a number >= min_value; 0.5 for any number; else 0."""
    out = []
    for completion, low in zip(completions, min_value, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        m = re.match(r"\s*(\d{1,12})", text)
        out.append(0.0 if not m else (1.0 if int(m.group(1)) >= low else 0.5))
    return out
