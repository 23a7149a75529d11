"""A small PromQL parser for the tests: enough of the language to check that the dashboard's and
the alerts' expressions are well formed and to list the metrics and labels they name.

It follows Prometheus' grammar (promql/parser/generated_parser.y) for what a dashboard uses:
vector and range selectors, subqueries, offset and @, function calls with their argument
types, aggregations with by/without before or after the arguments, binary operators with
their precedence, bool, on/ignoring and group_left/group_right. Types are checked the way
Prometheus does (rate() takes a range vector, a binary operator no range vector, ...), so an
expression Prometheus would refuse fails here too. Not covered: native-histogram literals,
quoted metric names and the experimental functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SCALAR, VECTOR, MATRIX, STRING = "scalar", "vector", "matrix", "string"

# name: (argument types, how many may be left out at the end, return type); "*" = variadic
FUNCTIONS: dict[str, tuple[tuple[str, ...], int, str]] = {
    **{
        f: ((VECTOR,), 0, VECTOR)
        for f in [
            "abs",
            "ceil",
            "exp",
            "floor",
            "ln",
            "log2",
            "log10",
            "sgn",
            "sqrt",
            "sort",
            "sort_desc",
            "timestamp",
            "absent",
            "histogram_avg",
            "histogram_count",
            "histogram_sum",
            "histogram_stddev",
            "histogram_stdvar",
        ]
    },
    **{
        f: ((MATRIX,), 0, VECTOR)
        for f in [
            "rate",
            "irate",
            "increase",
            "delta",
            "idelta",
            "deriv",
            "changes",
            "resets",
            "absent_over_time",
            "avg_over_time",
            "min_over_time",
            "max_over_time",
            "sum_over_time",
            "count_over_time",
            "stddev_over_time",
            "stdvar_over_time",
            "last_over_time",
            "present_over_time",
        ]
    },
    **{
        f: ((VECTOR,), 1, VECTOR)
        for f in [
            "day_of_month",
            "day_of_week",
            "day_of_year",
            "days_in_month",
            "hour",
            "minute",
            "month",
            "year",
        ]
    },
    "round": ((VECTOR, SCALAR), 1, VECTOR),
    "clamp": ((VECTOR, SCALAR, SCALAR), 0, VECTOR),
    "clamp_max": ((VECTOR, SCALAR), 0, VECTOR),
    "clamp_min": ((VECTOR, SCALAR), 0, VECTOR),
    "histogram_quantile": ((SCALAR, VECTOR), 0, VECTOR),
    "histogram_fraction": ((SCALAR, SCALAR, VECTOR), 0, VECTOR),
    "quantile_over_time": ((SCALAR, MATRIX), 0, VECTOR),
    "predict_linear": ((MATRIX, SCALAR), 0, VECTOR),
    "label_replace": ((VECTOR, STRING, STRING, STRING, STRING), 0, VECTOR),
    "label_join": ((VECTOR, STRING, STRING, "*"), 0, VECTOR),
    "scalar": ((VECTOR,), 0, SCALAR),
    "vector": ((SCALAR,), 0, VECTOR),
    "time": ((), 0, SCALAR),
    "pi": ((), 0, SCALAR),
}
# aggregation: the type of its parameter before the vector, if it takes one
AGGREGATIONS: dict[str, str | None] = {
    **{a: None for a in ["sum", "min", "max", "avg", "count", "group", "stddev", "stdvar"]},
    "topk": SCALAR,
    "bottomk": SCALAR,
    "quantile": SCALAR,
    "count_values": STRING,
}
# binary operators, loosest first
PRECEDENCE = [
    {"or"},
    {"and", "unless"},
    {"==", "!=", "<=", "<", ">=", ">"},
    {"+", "-"},
    {"*", "/", "%", "atan2"},
    {"^"},
]
SET_OPS = {"and", "or", "unless"}
COMPARISONS = PRECEDENCE[2]
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}

TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)(?![\w.])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`[^`]*`)
  | (?P<ident>[a-zA-Z_][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],:@])
    """,
    re.X,
)


class PromQLError(ValueError):
    pass


@dataclass
class Selector:
    metric: str | None
    matchers: list[tuple[str, str, str]]


@dataclass
class Query:
    """What one expression names: its selectors, the labels it groups or matches on, and the
    functions and aggregations it calls."""

    selectors: list[Selector] = field(default_factory=list)
    labels: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    type: str = VECTOR


def tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if not m:
            raise PromQLError(f"unexpected character {text[pos]!r} at {pos} in {text!r}")
        pos = m.end()
        kind = m.lastgroup or ""
        if kind != "space":
            tokens.append((kind, m.group()))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.query = Query()

    # -- tokens
    def peek(self, ahead: int = 0) -> tuple[str, str]:
        j = self.i + ahead
        return self.tokens[j] if j < len(self.tokens) else ("end", "")

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok[0] == "end":
            raise PromQLError(f"unexpected end of {self.text!r}")
        self.i += 1
        return tok

    def expect(self, value: str) -> None:
        _kind, got = self.take()
        if got != value:
            raise PromQLError(f"expected {value!r}, got {got!r} in {self.text!r}")

    def fail(self, what: str) -> PromQLError:
        return PromQLError(f"{what} at token {self.peek()[1]!r} in {self.text!r}")

    # -- grammar
    def parse(self) -> Query:
        self.query.type = self.expr(0)
        if self.peek()[0] != "end":
            raise self.fail("trailing input")
        return self.query

    def expr(self, level: int) -> str:
        if level == len(PRECEDENCE):
            return self.unary()
        left = self.expr(level + 1)
        while self.peek()[1] in PRECEDENCE[level] and self.peek()[0] in ("op", "ident"):
            op = self.take()[1]
            is_bool = self.peek()[1] == "bool"
            if is_bool:
                if op not in COMPARISONS:
                    raise self.fail("bool on a non-comparison")
                self.take()
            if self.peek()[1] in ("on", "ignoring"):
                self.take()
                self.query.labels |= self.label_list()
                if self.peek()[1] in ("group_left", "group_right"):
                    self.take()
                    if self.peek()[1] == "(":
                        self.query.labels |= self.label_list()
            # ^ is right-associative; the others are left-associative
            right = self.expr(level if op == "^" else level + 1)
            left = self.binary_type(op, left, right, is_bool)
        return left

    def binary_type(self, op: str, left: str, right: str, is_bool: bool) -> str:
        for side in (left, right):
            if side not in (SCALAR, VECTOR):
                raise self.fail(f"binary {op!r} on a {side}")
        if op in SET_OPS and SCALAR in (left, right):
            raise self.fail(f"{op!r} needs vectors on both sides")
        if op in COMPARISONS and left == right == SCALAR and not is_bool:
            raise self.fail("comparison of two scalars needs bool")
        return VECTOR if VECTOR in (left, right) else SCALAR

    def unary(self) -> str:
        if self.peek()[1] in ("-", "+"):
            self.take()
            kind = self.unary()
            if kind not in (SCALAR, VECTOR):
                raise self.fail(f"unary minus on a {kind}")
            return kind
        return self.postfix(self.primary())

    def postfix(self, kind: str) -> str:
        while True:
            tok = self.peek()[1]
            if tok == "[":
                self.take()
                self.duration()
                if self.peek()[1] == ":":  # subquery: any instant vector, [range:step]
                    if kind != VECTOR:
                        raise self.fail(f"subquery of a {kind}")
                    self.take()
                    if self.peek()[0] == "duration":
                        self.duration()
                elif not self.last_was_selector:
                    raise self.fail("a range needs a selector or a subquery")
                self.expect("]")
                kind = MATRIX
            elif tok == "offset":
                self.take()
                if self.peek()[1] == "-":
                    self.take()
                self.duration()
            elif tok == "@":
                self.take()
                if self.peek()[1] in ("start", "end"):
                    self.take()
                    self.expect("(")
                    self.expect(")")
                elif self.take()[0] != "number":
                    raise self.fail("@ needs a timestamp")
            else:
                return kind
            self.last_was_selector = False

    def duration(self) -> None:
        kind, value = self.take()
        if kind != "duration":
            raise PromQLError(f"expected a duration, got {value!r} in {self.text!r}")

    last_was_selector = False

    def primary(self) -> str:
        self.last_was_selector = False
        kind, value = self.peek()
        if value == "(":
            self.take()
            inner = self.expr(0)
            self.expect(")")
            self.last_was_selector = False  # (x)[5m] is refused: a range needs a selector
            return inner
        if kind == "number" or value in ("Inf", "NaN", "inf", "nan"):
            self.take()
            return SCALAR
        if kind == "string":
            self.take()
            return STRING
        if value == "{":
            return self.selector(None)
        if kind == "ident":
            if value in AGGREGATIONS and self.peek(1)[1] in ("(", "by", "without"):
                kind = self.aggregation()
                self.last_was_selector = False
                return kind
            if self.peek(1)[1] == "(":
                kind = self.call()
                self.last_was_selector = False
                return kind
            if value in KEYWORDS or value in SET_OPS:
                raise self.fail(f"keyword {value!r} where an expression belongs")
            self.take()
            return self.selector(value)
        raise self.fail("expected an expression")

    def selector(self, metric: str | None) -> str:
        matchers: list[tuple[str, str, str]] = []
        if self.peek()[1] == "{":
            self.take()
            while self.peek()[1] != "}":
                kind, label = self.take()
                if kind != "ident" or ":" in label:
                    raise PromQLError(f"bad label name {label!r} in {self.text!r}")
                op = self.take()[1]
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"bad matcher operator {op!r} in {self.text!r}")
                kind, raw = self.take()
                if kind != "string":
                    raise PromQLError(f"label value must be a string, got {raw!r}")
                value = raw[1:-1]
                if op in ("=~", "!~"):
                    try:
                        re.compile(value)
                    except re.error as err:
                        raise PromQLError(f"bad regex {value!r}: {err}") from err
                matchers.append((label, op, value))
                if self.peek()[1] == ",":
                    self.take()
                elif self.peek()[1] != "}":
                    raise self.fail("expected ',' or '}'")
            self.take()
        if metric is None and not any(op in ("=", "=~") and v for _, op, v in matchers):
            raise PromQLError(f"a selector needs a name or a non-empty matcher: {self.text!r}")
        self.query.selectors.append(Selector(metric, matchers))
        self.last_was_selector = True
        return VECTOR

    def label_list(self) -> set[str]:
        self.expect("(")
        labels = set()
        while self.peek()[1] != ")":
            kind, label = self.take()
            if kind != "ident" or ":" in label:
                raise PromQLError(f"bad label name {label!r} in {self.text!r}")
            labels.add(label)
            if self.peek()[1] == ",":
                self.take()
            elif self.peek()[1] != ")":
                raise self.fail("expected ',' or ')'")
        self.take()
        return labels

    def arguments(self) -> list[str]:
        self.expect("(")
        kinds = []
        while self.peek()[1] != ")":
            kinds.append(self.expr(0))
            if self.peek()[1] == ",":
                self.take()
            elif self.peek()[1] != ")":
                raise self.fail("expected ',' or ')'")
        self.take()
        return kinds

    def call(self) -> str:
        name = self.take()[1]
        if name not in FUNCTIONS:
            raise PromQLError(f"unknown function {name!r} in {self.text!r}")
        self.query.functions.add(name)
        wanted, optional, returns = FUNCTIONS[name]
        got = self.arguments()
        if wanted and wanted[-1] == "*":
            fixed = wanted[:-1]
            ok = len(got) >= len(fixed) and all(g == STRING for g in got[len(fixed) :])
        else:
            fixed = wanted
            ok = len(fixed) - optional <= len(got) <= len(fixed)
        if not ok or any(g != w for g, w in zip(got, fixed, strict=False)):
            raise PromQLError(f"{name}() takes {list(wanted)}, got {got} in {self.text!r}")
        return returns

    def aggregation(self) -> str:
        name = self.take()[1]
        self.query.functions.add(name)
        grouped = False
        if self.peek()[1] in ("by", "without"):
            self.take()
            self.query.labels |= self.label_list()
            grouped = True
        got = self.arguments()
        if not grouped and self.peek()[1] in ("by", "without"):
            self.take()
            self.query.labels |= self.label_list()
        param = AGGREGATIONS[name]
        wanted = [VECTOR] if param is None else [param, VECTOR]
        if got != wanted:
            raise PromQLError(f"{name} takes {wanted}, got {got} in {self.text!r}")
        return VECTOR


def parse(text: str) -> Query:
    """Parse one PromQL expression; PromQLError says what is wrong with it."""
    return _Parser(text).parse()
