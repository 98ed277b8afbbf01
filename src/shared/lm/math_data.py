r"""Math word problems for the ``paper`` profile of the RL chapters: GSM8K and MATH-500, with a verifier.

The loaders read the Hugging Face datasets through ``datasets.load_dataset``, or, given ``path``, a
local JSONL or Parquet file with the same fields. Tests and offline runs use the local form.

* GSM8K (``openai/gsm8k``, config ``main``): ``question``, ``answer`` with the final answer after ``####``;
* MATH-500 (``HuggingFaceH4/MATH-500``, split ``test``) and AIME 2024 (``HuggingFaceH4/aime_2024``,
  split ``train``): ``problem``, ``answer``;
* RLVR training sets in verl's format, e.g. DAPO-Math-17k (``BytedTsinghua-SIA/DAPO-Math-17k``) and
  LUFFY's OpenR1-Math-46k (``Elliott/Openr1-Math-46k-8192``): ``prompt`` (a list of chat messages,
  whose user turn already carries the data set's own instruction) and ``reward_model.ground_truth``.

:func:`load_math_dataset` picks the loader from a hub name or, for a local file, from its fields.

The reward is the exact-match verdict of :func:`math_verify` on the extracted final answer: the last
``\boxed{...}`` of the response (nested braces allowed), else the number after ``####``, else the
last number in the text, compared with the reference after light normalisation (spaces,
``\left``/``\right``, ``\dfrac``, ``\frac{a}{b}`` = ``a/b``, thousands separators, trailing ``.0``)
and, when both sides are numbers, by value.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

INSTRUCTION = r"Please reason step by step, and put your final answer within \boxed{}."
"""The instruction Qwen2.5-Math and most RLVR papers append to each problem."""


@dataclass(frozen=True)
class MathProblem:
    """One problem: the question text, the reference final answer, and the data set it comes from."""

    prompt: str
    answer: str
    source: str
    instruction: str = INSTRUCTION  # appended to the prompt; "" when the prompt already carries one (verl data)


# ## Loading


def _read_local(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local ``.jsonl`` (one JSON object per line) or ``.parquet`` file (the latter needs pandas + pyarrow)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _rows(hf_name: str, hf_config: str | None, split: str, path: str | Path | None) -> list[dict[str, Any]]:
    if path is not None:
        return _read_local(path)
    from datasets import load_dataset  # the `paper` extra; never imported by the quick profile

    ds = load_dataset(hf_name, hf_config, split=split) if hf_config else load_dataset(hf_name, split=split)
    return [dict(r) for r in ds]


def gsm8k_final_answer(solution: str) -> str:
    """The reference answer of a GSM8K solution: the text after ``####``, without thousands separators."""
    if "####" not in solution:
        raise ValueError("a GSM8K solution must contain '####' followed by the final answer")
    return solution.split("####")[-1].strip().replace(",", "")


def load_gsm8k(split: str = "test", n: int | None = None, path: str | Path | None = None) -> list[MathProblem]:
    """GSM8K problems of ``split`` (``train`` or ``test``), the first ``n`` if given."""
    rows = _rows("openai/gsm8k", "main", split, path)
    rows = rows if n is None else rows[:n]
    return [MathProblem(r["question"], gsm8k_final_answer(r["answer"]), "gsm8k") for r in rows]


def load_math500(n: int | None = None, path: str | Path | None = None) -> list[MathProblem]:
    """The MATH-500 test problems (Lightman et al.'s subset of MATH), the first ``n`` if given."""
    rows = _rows("HuggingFaceH4/MATH-500", None, "test", path)
    rows = rows if n is None else rows[:n]
    return [MathProblem(r["problem"], str(r["answer"]), "math500") for r in rows]


def load_aime24(n: int | None = None, path: str | Path | None = None) -> list[MathProblem]:
    """The 30 AIME 2024 problems (integer answers 0-999)."""
    rows = _rows("HuggingFaceH4/aime_2024", None, "train", path)
    rows = rows if n is None else rows[:n]
    return [MathProblem(r["problem"], str(r["answer"]), "aime24") for r in rows]


def _user_turn(prompt: Any) -> str:
    """The text of a verl ``prompt``: a plain string, or the last user message of a chat."""
    if isinstance(prompt, str):
        return prompt
    turns = [m for m in list(prompt) if m.get("role", "user") == "user"]
    if not turns:
        raise ValueError("a verl-format prompt must contain a user message")
    return str(turns[-1]["content"])


def load_verl_math(name: str, split: str = "train", n: int | None = None, path: str | Path | None = None,
                   dedupe: bool = True) -> list[MathProblem]:
    """Problems of an RLVR training set in verl's format (``prompt`` chat + ``reward_model.ground_truth``).

    The user turn is kept as it is, with the data set's own instruction (DAPO-Math-17k asks for a last
    line ``Answer: ...``), so ``instruction`` is empty. ``dedupe`` keeps the first occurrence of each
    prompt (the DAPO-Math-17k hub file repeats its ~17k problems many times), then ``n`` keeps the first ``n``.
    """
    problems, seen = [], set()
    for r in _rows(name, None, split, path):
        text = _user_turn(r["prompt"])
        if dedupe and text in seen:
            continue
        seen.add(text)
        problems.append(MathProblem(text, str(r["reward_model"]["ground_truth"]), name.rsplit("/", 1)[-1], instruction=""))
        if n is not None and len(problems) == n:
            break
    return problems


HUB_LOADERS = {
    "openai/gsm8k": lambda n, path: load_gsm8k("train", n, path),
    "HuggingFaceH4/MATH-500": load_math500,
    "HuggingFaceH4/aime_2024": load_aime24,
    "BytedTsinghua-SIA/DAPO-Math-17k": lambda n, path: load_verl_math("BytedTsinghua-SIA/DAPO-Math-17k", "train", n, path),
    "Elliott/Openr1-Math-46k-8192": lambda n, path: load_verl_math("Elliott/Openr1-Math-46k-8192", "train", n, path),
}
"""The data sets the RL chapters' ``paper`` profiles name (GSM8K here means its training split)."""


def load_math_dataset(name: str, n: int | None = None) -> list[MathProblem]:
    """Problems from a hub name of :data:`HUB_LOADERS` or a local ``.jsonl`` / ``.parquet`` file.

    A local file's format is read from its first row: ``reward_model`` → verl, ``question`` → GSM8K,
    ``problem`` → MATH-500 / AIME.
    """
    if name in HUB_LOADERS:
        return HUB_LOADERS[name](n, None)
    path = Path(name)
    if path.suffix not in (".jsonl", ".parquet") or not path.exists():
        raise ValueError(f"data {name!r} is neither a known data set ({', '.join(HUB_LOADERS)}) nor a local .jsonl/.parquet file")
    rows = _read_local(path)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    first = rows[0]
    if "reward_model" in first:
        return load_verl_math(path.stem, n=n, path=path)
    if "question" in first:
        return load_gsm8k(n=n, path=path)
    if "problem" in first:
        return load_math500(n=n, path=path)
    raise ValueError(f"{path}: unknown fields {sorted(first)}; expected verl (prompt, reward_model), GSM8K (question, answer) or MATH (problem, answer)")


# ## Answers


def _boxed_contents(text: str) -> list[str]:
    r"""Contents of every ``\boxed{...}`` / ``\fbox{...}`` in ``text``, nested braces matched."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    return out


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def extract_answer(text: str) -> str | None:
    r"""The final answer of a response: the last ``\boxed{...}``, else what follows the last
    ``Answer:`` on its line (DAPO's format), else the number after the last ``####``, else the last
    number of the text; ``None`` when there is none."""
    boxed = _boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    answer_lines = re.findall(r"Answer:[ \t]*(.+)", text)
    if answer_lines and answer_lines[-1].strip():
        return answer_lines[-1].strip().rstrip(".").strip("$ ")
    if "####" in text:
        m = re.search(_NUMBER, text.split("####")[-1])
        if m:
            return m.group(0).rstrip(",")
    numbers = re.findall(_NUMBER, text)
    return numbers[-1].rstrip(",") if numbers else None


def _strip_text_wrappers(s: str) -> str:
    return re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)


def normalize_answer(answer: str) -> str:
    r"""A canonical string for comparison: no spaces, ``\left``/``\right``, ``$``, ``\!``, or trailing
    period; ``\dfrac``/``\tfrac`` → ``\frac``; ``\frac{a}{b}`` and ``\frac ab`` → ``a/b``; thousands
    separators dropped and ``72.0`` → ``72``."""
    s = answer.strip()
    s = _strip_text_wrappers(s)
    for token in (r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\ ", "$"):
        s = s.replace(token, "")
    s = re.sub(r"\s+", "", s)
    s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac")
    s = re.sub(r"\^\{\\circ\}|\^\\circ|\\%|%", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    prev = None
    arg = r"\{((?:[^{}]|\{[^{}]*\})*)\}"  # one level of nested braces, e.g. \frac{\sqrt{3}}{2}
    while prev != s:  # innermost first
        prev = s
        s = re.sub(r"\\frac" + arg + arg, lambda m: _ratio(m.group(1), m.group(2)), s)
    s = re.sub(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d])", lambda m: m.group(1).replace(",", ""), s)
    s = re.sub(r"(\d+)\.0+(?!\d)", r"\1", s)
    s = s.rstrip(".")
    return s


def _ratio(num: str, den: str) -> str:
    wrap = lambda x: f"({x})" if re.search(r"[+*/]|(?<=.)-", x) else x  # noqa: E731
    return f"{wrap(num)}/{wrap(den)}"


def _as_number(s: str) -> Fraction | None:
    """The value of ``s`` if it is an integer, decimal or ratio of two such numbers."""
    m = re.fullmatch(r"(-?\d*\.?\d+)(?:/(-?\d*\.?\d+))?", s)
    if not m:
        return None
    try:
        value = Fraction(m.group(1))
        if m.group(2) is not None:
            value /= Fraction(m.group(2))
    except (ValueError, ZeroDivisionError):
        return None
    return value


def answers_match(predicted: str, reference: str) -> bool:
    """Whether two final answers agree after :func:`normalize_answer`, as strings or as numbers."""
    a, b = normalize_answer(predicted), normalize_answer(reference)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and x == y


def math_verify(problem: MathProblem, response: str) -> float:
    """The verifiable reward: 1.0 if the final answer of ``response`` equals the problem's answer, else 0.0."""
    predicted = extract_answer(response)
    return float(predicted is not None and answers_match(predicted, problem.answer))


# ## Prompts


def chat_prompt(problem: MathProblem, tokenizer: Any = None, instruction: str | None = None,
                system: str | None = None) -> str:
    """The prompt text for ``problem``: the tokenizer's chat template (as a user turn, with the
    generation prompt) when it has one, else a plain ``Question: ... Answer:`` frame.

    ``tokenizer`` may be a Hugging Face tokenizer or an :class:`~shared.lm.hf_policy.HFTokenizerAdapter`;
    ``instruction`` defaults to the problem's own.
    """
    instruction = problem.instruction if instruction is None else instruction
    content = f"{problem.prompt}\n{instruction}" if instruction else problem.prompt
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if tok is not None and getattr(tok, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = f"{system}\n\n" if system else ""
    return f"{head}Question: {content}\nAnswer:"
