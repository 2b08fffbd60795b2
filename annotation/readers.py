"""Reading the annotation tool's input files: items to rate, ratings made elsewhere (in the
shapes real studies publish) and the mappings that describe those shapes; and the score check
the rating forms share. Every error names the file, the line and the field, and one bad row
rejects the whole file.

Items (``annotate import``), JSON Lines ``{"query", "responses": [{"text", "source"?, "gold"?}],
"item_id"?}`` or CSV ``query,response,source`` (rows with the same query form one item).

Ratings (``annotate import-ratings``), three shapes, all from JSON Lines or CSV
(``metaaligner_core.io.iter_records``):

* **long** (no mapping; the ``annotate export --format ratings`` shape): one rating per row,
  ``{"item_id"?, "query", "response", "source"?, "annotator", "objective", "score", "note"?}``.
* **lists**: one row per response, a column per aspect holding every rater's score as a list
  (``"[3, 3, 2]"``), as in the MentalLLaMA human evaluation files
  (``text,label,gpt-3.5-turbo,fluency,completeness,reliability,overall``). Mapping::

      query: text                    # column of the query
      response: gpt-3.5-turbo        # column of the rated response
      source: "=gpt-3.5-turbo"       # a column, or "=TEXT" for one value for every row
      item_id: id                    # optional
      aspects: {fluency: fluency, completeness: completeness}   # column -> objective key
      raters: [expert1, expert2, expert3]                       # names of the list positions

* **wide**: one row per response, a column per rater (and objective)::

      query: query
      response: response
      scores:                        # column -> who rated which objective
        fluency_A: {annotator: A, objective: fluency}
        fluency_B: {annotator: B, objective: fluency}

An empty cell (or ``null`` inside a list) is a rating not made.
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

from metaaligner_core.errors import InputError, MetaAlignerError
from metaaligner_core.io import iter_records

from .protocols import SCORES, Protocol, protocol_help

FIELDS = ("query", "response", "source", "item_id", "note")


@dataclass
class RatingIn:
    line: int
    item_id: str | None
    query: str
    response: str
    source: str | None
    annotator: str
    objective: str
    score: int
    note: str | None


def load_mapping(spec: str | dict | None) -> dict | None:
    """A mapping from a YAML/JSON file path, an inline JSON object, or a dict."""
    if spec is None or isinstance(spec, dict):
        return spec
    text = str(spec).strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MetaAlignerError(f"--mapping: not valid JSON ({e.msg})") from None
    else:
        path = Path(text)
        if not path.is_file():
            raise MetaAlignerError(f"--mapping {text}: no such file (give a YAML/JSON file or an inline JSON object)")
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise InputError(path, mark.line + 1 if mark else None, None, "not valid YAML") from None
    if not isinstance(data, dict):
        raise MetaAlignerError(f"--mapping {text}: expected a mapping (query, response, aspects or scores)")
    return data


def _objective(proto: Protocol, key: str, path, line, fld: str) -> str:
    if not proto.has(key):
        raise InputError(path, line, fld, f'"{key}" is not in protocol "{proto.name}" (valid: '
                         f'{", ".join(proto.keys)}); for other aspects pass --protocol FILE with '
                         f'{protocol_help()}')
    return proto.objective(key).key


def parse_score(value, scores=SCORES) -> int | None:
    """A score of ``scores`` from an int, an integral float or a digit string (CSV); None for
    anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value in scores else None


def check_score(value, scores=SCORES) -> int:
    """A score sent from a rating form (the app, the command line); a one-line error otherwise."""
    score = parse_score(value, scores)
    if score is None:
        raise MetaAlignerError(f"score {value!r}: expected an integer {min(scores)}-{max(scores)}")
    return score


def _score(value, proto: Protocol, key: str, path, line, fld: str) -> int:
    obj = proto.objective(key)
    score = parse_score(value, obj.scores)
    if score is None:
        raise InputError(path, line, fld, f"expected an integer {obj.scores[0]}-{obj.scores[-1]}, got {value!r}")
    return score


def _text(rec: dict, column: str | None, path, line, fld: str, required: bool = True) -> str | None:
    if column is None:
        return None
    if column.startswith("="):
        return column[1:]
    value = rec.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InputError(path, line, column, "missing or empty")
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and fld in ("item_id", "source"):
        value = str(value)
    if not isinstance(value, str):
        raise InputError(path, line, column, f"expected text, got {type(value).__name__}")
    return value


def _score_list(value, path, line, column: str) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, str) and value.strip():
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, (list, tuple)):
            return list(parsed)
        if isinstance(parsed, int):
            return [parsed]
    raise InputError(path, line, column, f'expected a list of scores such as "[3, 3, 2]", got {value!r}')


def read_rating_file(path, proto: Protocol, mapping: dict | str | None = None) -> list[RatingIn]:
    mapping = load_mapping(mapping)
    rows = _read_long(path, proto) if not mapping else _read_mapped(path, proto, mapping)
    seen: dict[tuple, int] = {}
    for r in rows:
        key = (r.item_id, r.query, r.response, r.annotator, r.objective)
        if key in seen:
            raise InputError(path, r.line, "objective", f"a second rating of this response by {r.annotator} "
                             f"on this objective (first at line {seen[key]})")
        seen[key] = r.line
    if not rows:
        raise MetaAlignerError(f"{path}: no ratings")
    return rows


def _read_long(path, proto: Protocol) -> list[RatingIn]:
    rows: list[RatingIn] = []
    for line, rec in iter_records(path):
        item_id = _text(rec, "item_id", path, line, "item_id", required=False)
        query = _text(rec, "query", path, line, "query")
        response = _text(rec, "response", path, line, "response")
        annotator = _text(rec, "annotator", path, line, "annotator").strip()
        objective = _objective(proto, _text(rec, "objective", path, line, "objective"), path, line, "objective")
        if rec.get("score") is None or rec.get("score") == "":
            raise InputError(path, line, "score", "missing")
        score = _score(rec["score"], proto, objective, path, line, "score")
        note = rec.get("note")
        rows.append(RatingIn(line, item_id, query, response, _text(rec, "source", path, line, "source", required=False),
                             annotator, objective, score, note if isinstance(note, str) and note else None))
    return rows


def _read_mapped(path, proto: Protocol, mapping: dict) -> list[RatingIn]:
    unknown = set(mapping) - {*FIELDS, "aspects", "raters", "scores"}
    if unknown:
        raise MetaAlignerError(f"--mapping: unknown keys {', '.join(sorted(unknown))} "
                               "(expected query, response, source, item_id, note, aspects + raters, or scores)")
    aspects, scores = mapping.get("aspects"), mapping.get("scores")
    if bool(aspects) == bool(scores):
        raise MetaAlignerError("--mapping: give either aspects (a column per aspect holding a list of every "
                               "rater's scores) or scores (a column per rater)")
    cols = {f: mapping.get(f, f if f in ("query", "response") else None) for f in FIELDS}
    for f, c in cols.items():
        if c is not None and not isinstance(c, str):
            raise MetaAlignerError(f"--mapping: {f} must name a column (or \"=TEXT\")")
    if aspects is not None:
        if not isinstance(aspects, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aspects.items()):
            raise MetaAlignerError("--mapping: aspects must map column names to objective keys")
        raters = mapping.get("raters")
        if raters is not None and (not isinstance(raters, list) or not all(isinstance(x, str) and x.strip() for x in raters)):
            raise MetaAlignerError("--mapping: raters must be a list of names (one per list position)")
        targets = {col: _objective(proto, key, "--mapping", None, f"aspects.{col}") for col, key in aspects.items()}
    else:
        if not isinstance(scores, dict):
            raise MetaAlignerError("--mapping: scores must map columns to {annotator, objective}")
        targets = {}
        for col, spec in scores.items():
            if not isinstance(spec, dict) or not isinstance(spec.get("annotator"), str) \
                    or not isinstance(spec.get("objective"), str):
                raise MetaAlignerError(f"--mapping: scores.{col} must be {{annotator: NAME, objective: KEY}}")
            targets[col] = (spec["annotator"].strip(),
                            _objective(proto, spec["objective"], "--mapping", None, f"scores.{col}.objective"))
    rows: list[RatingIn] = []
    checked_columns = False
    for line, rec in iter_records(path):
        if not checked_columns:
            missing = [c for c in [*targets, *(c for c in cols.values() if c and not c.startswith("="))]
                       if c not in rec and c not in (cols["source"], cols["item_id"], cols["note"])]
            if missing:
                raise InputError(path, line, missing[0], f"no such column (columns: {', '.join(map(str, rec))})")
            checked_columns = True
        query = _text(rec, cols["query"], path, line, "query")
        response = _text(rec, cols["response"], path, line, "response")
        source = _text(rec, cols["source"], path, line, "source", required=False)
        item_id = _text(rec, cols["item_id"], path, line, "item_id", required=False)
        note = _text(rec, cols["note"], path, line, "note", required=False)
        if aspects is not None:
            for col, key in targets.items():
                if rec.get(col) in (None, ""):
                    continue
                values = _score_list(rec[col], path, line, col)
                names = raters or [f"rater{i + 1}" for i in range(len(values))]
                if len(values) > len(names):
                    raise InputError(path, line, col, f"{len(values)} scores but the mapping names "
                                     f"{len(names)} raters")
                for i, v in enumerate(values):
                    if v is None:
                        continue
                    rows.append(RatingIn(line, item_id, query, response, source, names[i].strip(), key,
                                         _score(v, proto, key, path, line, f"{col}[{i}]"), note))
        else:
            for col, (who, key) in targets.items():
                if rec.get(col) in (None, ""):
                    continue
                rows.append(RatingIn(line, item_id, query, response, source, who, key,
                                     _score(rec[col], proto, key, path, line, col), note))
    return rows


# ----------------------------------------------------------------------------- item files

@dataclass
class ItemIn:
    line: int
    item_id: str | None
    query: str
    responses: list[tuple[str, str | None, dict | None]]  # (text, source, gold scores)


def read_item_file(path, proto: Protocol) -> list[ItemIn]:
    """The items of a JSON Lines or CSV file (see the module docstring), gold scores checked
    against ``proto``."""
    items: dict[tuple, ItemIn] = {}
    is_csv = str(path).lower().endswith((".csv", ".csv.gz"))
    for line, rec in iter_records(path):
        query = _text(rec, "query", path, line, "query")
        item_id = _text(rec, "item_id", path, line, "item_id", required=False)
        if is_csv:
            text = _text(rec, "response", path, line, "response")
            resp = [(text, _text(rec, "source", path, line, "source", required=False), None)]
        else:
            raw = rec.get("responses")
            if not isinstance(raw, list) or not raw:
                raise InputError(path, line, "responses", 'expected a non-empty list of {"text", "source"?}')
            resp = []
            for i, r in enumerate(raw):
                if isinstance(r, str):
                    r = {"text": r}
                if not isinstance(r, dict):
                    raise InputError(path, line, f"responses[{i}]", 'expected {"text", "source"?}')
                text = r.get("text")
                if not isinstance(text, str) or not text.strip():
                    raise InputError(path, line, f"responses[{i}].text", "missing or empty")
                source = r.get("source")
                resp.append((text, None if source in (None, "") else str(source),
                             _gold(r.get("gold"), proto, path, line, f"responses[{i}].gold")))
        key = (item_id, query) if is_csv else (item_id, query, line)
        if key in items:
            items[key].responses.extend(resp)
        else:
            items[key] = ItemIn(line, item_id, query, resp)
    if not items:
        raise MetaAlignerError(f"{path}: no items")
    return list(items.values())


def _gold(raw, proto: Protocol, path, line, fld: str) -> dict | None:
    """A gold response's known scores ``{objective: score}``, checked against the protocol."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise InputError(path, line, fld, "expected {objective: score}")
    out = {}
    for key, value in raw.items():
        key = _objective(proto, str(key), path, line, f"{fld}.{key}")
        out[key] = _score(value, proto, key, path, line, f"{fld}.{key}")
    return out
