"""Token-level view of preprocessed MSL: tokens with their .metal file:line, bracket matching,
`[[...]]` attribute lists and the scope (namespace, class, function body) of every token."""

from __future__ import annotations

import dataclasses
import re

MARKERS = {
    "__msim_device": "device",
    "__msim_constant": "constant",
    "__msim_threadgroup": "threadgroup",
    "__msim_thread": "thread",
}


# Thread-position attributes -> (field of __msim_ids, number of components).
class GenError(Exception):
    """A problem in the .metal source, reported as `file:line: message`."""


@dataclasses.dataclass
class Tok:
    kind: str  # id, num, str, chr, punct, ws, dir
    text: str
    file: str
    line: int
    shim: bool  # token comes from msim's own headers: never rewritten
    orig: str = ""  # text before any rewrite (structure checks must not see blanked tokens)

    def __post_init__(self):
        self.orig = self.orig or self.text


_TOKEN_RE = re.compile(
    r"""(?P<ws>[ \t\r\f\v]+|\n)
      |(?P<id>[A-Za-z_]\w*)
      |(?P<num>\.?\d(?:[eEpP][+-]|[\w.'])*)
      |(?P<str>"(?:\\.|[^"\\\n])*")
      |(?P<chr>'(?:\\.|[^'\\\n])*')
      |(?P<punct>::|->|\.\.\.|<<=|>>=|<=|>=|==|!=|&&|\|\||\+\+|--|[-+*/%&|^!=]=|<<|>>|.)
    """,
    re.VERBOSE | re.DOTALL,
)
_LINEMARK_RE = re.compile(r'#\s*(\d+)\s+"((?:\\.|[^"\\])*)"')


def tokenize(text: str, shim_dirs: tuple[str, ...]) -> list[Tok]:
    """Split preprocessor output into tokens, tracking the original file:line via line markers."""
    toks: list[Tok] = []
    file, line, shim = "<input>", 1, False
    pos, n = 0, len(text)
    at_line_start = True
    while pos < n:
        if at_line_start and text.startswith("#", pos):
            end = text.find("\n", pos)
            end = n if end < 0 else end
            directive = text[pos:end]
            m = _LINEMARK_RE.match(directive)
            toks.append(Tok("dir", directive, file, line, True))
            pos = end
            if m:
                file = m.group(2).encode().decode("unicode_escape")
                line = int(m.group(1)) - 1  # the newline ending the marker advances it
                shim = any(file.startswith(d) for d in shim_dirs) or file.startswith("<")
            continue
        m = _TOKEN_RE.match(text, pos)
        kind = m.lastgroup
        tok_text = m.group()
        toks.append(Tok(kind, tok_text, file, line, shim))
        if tok_text == "\n":
            line += 1
            at_line_start = True
        elif kind != "ws":
            at_line_start = False
        pos = m.end()
    return toks


def err(tok: Tok, msg: str) -> GenError:
    return GenError(f"{tok.file}:{tok.line}: error: {msg}")


class Unit:
    """Token stream plus the structural facts both rewrites and kernel parsing need."""

    def __init__(self, toks: list[Tok]):
        self.toks = toks
        self.sig = [i for i, t in enumerate(toks) if t.kind not in ("ws", "dir")]
        self.in_kernel: list[bool] = []  # set by scope_kinds

    def text(self, idxs) -> str:
        return " ".join(self.toks[i].text for i in idxs)

    def blank(self, i: int) -> None:
        self.toks[i].text = " " * len(self.toks[i].text)


_INT_EXPR = re.compile(r"[\d\s+\-*/%()<>|&^~]+")


def int_expr(text: str) -> int | None:
    """Value of an integer constant expression made of literals and arithmetic (an attribute
    argument such as `FC_BASE + 3` after preprocessing), or None."""
    text = re.sub(r"(?<=[\da-fA-F])[uUlL]+\b", "", text.strip())
    text = re.sub(r"0[xX][\da-fA-F]+", lambda m: str(int(m.group(), 16)), text)
    if not text or not _INT_EXPR.fullmatch(text) or "**" in text:
        return None
    try:
        value = eval(text.replace("/", "//"), {"__builtins__": {}}, {})  # digits and operators only
    except (SyntaxError, ArithmeticError, TypeError):
        return None
    return value if isinstance(value, int) else None


def match_close(u: Unit, k: int, open_: str, close: str) -> int:
    """Position in u.sig of the bracket closing the one at u.sig[k]."""
    depth = 0
    for j in range(k, len(u.sig)):
        t = u.toks[u.sig[j]].orig  # structure, not rewritten or blanked text
        if t == open_:
            depth += 1
        elif t == close:
            depth -= 1
            if depth == 0:
                return j
    raise err(u.toks[u.sig[k]], f"unbalanced '{open_}'")


def match_angle(u: Unit, k: int) -> int:
    """Closing '>' of a template argument list starting at u.sig[k] == '<'."""
    depth = 0
    j = k
    while j < len(u.sig):
        t = u.toks[u.sig[j]].orig
        if t in ("(", "["):
            j = match_close(u, j, t, ")" if t == "(" else "]")
        elif t == "<":
            # A nested list follows a template name; after `)` or a literal (`sizeof(T) < 8`)
            # it is the less-than operator.
            if j == k or re.fullmatch(r"[A-Za-z_]\w*", u.toks[u.sig[j - 1]].orig):
                depth += 1
        elif t == ">":
            depth -= 1
        elif t == ">>":
            depth -= 2
        if depth <= 0:
            return j
        j += 1
    raise err(u.toks[u.sig[k]], "unbalanced '<'")


def attr_lists(u: Unit):
    """Yield (start, end) sig positions of every `[[ ... ]]` in user (non-shim) code."""
    k = 0
    s = u.sig
    while k + 1 < len(s):
        a, b = u.toks[s[k]], u.toks[s[k + 1]]
        if a.text == "[" and b.text == "[" and not a.shim:
            end = match_close(u, k, "[", "]")
            yield k, end
            k = end + 1
        else:
            k += 1


def parse_attrs(u: Unit, start: int, end: int) -> list[tuple[str, str, Tok]]:
    """Attributes inside `[[ ... ]]` as (name, argument text, token)."""
    out = []
    k = start + 2
    while k < end - 1:
        t = u.toks[u.sig[k]]
        if t.text == ",":
            k += 1
            continue
        name = t.text
        arg = ""
        if u.toks[u.sig[k + 1]].text == "(":
            close = match_close(u, k + 1, "(", ")")
            arg = "".join(u.toks[u.sig[j]].text for j in range(k + 2, close))
            k = close + 1
        else:
            k += 1
        name = MARKERS.get(name, name).replace("__msim_", "")
        out.append((name, arg, t))
    return out


def scope_kinds(u: Unit, attr_at: dict) -> tuple[list[str], list[list[str]]]:
    """Innermost scope kind ('ns', 'class', 'body', 'init') and namespace path per sig position.

    Also sets `u.in_kernel[k]`: whether position k lies in the body of a kernel function (one
    declared with `kernel` or `[[kernel]]`), where MSL allows threadgroup variables.
    """
    kinds: list[str] = []
    paths: list[list[str]] = []
    in_kernel: list[bool] = []
    stack: list[tuple[str, str | None, bool]] = [("ns", None, False)]
    stmt_start = 0
    k = 0
    s = u.sig
    while k < len(s):
        if k in attr_at:  # attribute lists never open scopes
            end = attr_at[k][0]
            for _ in range(k, end + 1):
                kinds.append(stack[-1][0])
                in_kernel.append(stack[-1][2])
                paths.append([n for kind, n, _ in stack if kind == "ns" and n])
            k = end + 1
            continue
        t = u.toks[s[k]].text
        kinds.append(stack[-1][0])
        in_kernel.append(stack[-1][2])
        paths.append([n for kind, n, _ in stack if kind == "ns" and n])
        if t == "{":
            if stack[-1][0] in ("body", "init"):
                kind, name, kern = stack[-1][0], None, stack[-1][2]
            else:
                kind, name = _classify_brace(u, stmt_start, k, attr_at)
                kern = kind == "body" and _declares_kernel(u, stmt_start, k, attr_at)
            stack.append((kind, name, kern))
            stmt_start = k + 1
        elif t == "}":
            if len(stack) > 1:
                stack.pop()
            stmt_start = k + 1
        elif t == ";":
            stmt_start = k + 1
        k += 1
    u.in_kernel = in_kernel
    return kinds, paths


def _declares_kernel(u: Unit, lo: int, hi: int, attr_at: dict) -> bool:
    for j in range(lo, hi):
        if u.toks[u.sig[j]].text == "__msim_kernel":
            return True
        if j in attr_at and any(a[0] == "kernel" for a in attr_at[j][1]):
            return True
    return False


_CLASS_KEYS = ("struct", "class", "union", "enum")
_NOT_A_CALL = ("alignas", "__attribute__", "__declspec", "decltype")


def _classify_brace(u: Unit, lo: int, k: int, attr_at: dict) -> tuple[str, str | None]:
    """Kind of the scope opened by the '{' at sig position k, from its statement head [lo, k).

    Only top-level tokens count: template heads (`template <class T, int N = 4>`), template
    argument lists and parentheses are skipped, so a default template argument or a default
    function argument is not mistaken for a variable initializer.
    """
    top: list[str] = []
    j = lo
    while j < k:
        if j in attr_at:
            j = attr_at[j][0] + 1
            continue
        t = u.toks[u.sig[j]].text
        if t == "template" and j + 1 < k and u.toks[u.sig[j + 1]].text == "<":
            j = match_angle(u, j + 1) + 1  # the template head, defaults included
            continue
        if t == "<" and top and re.fullmatch(r"[A-Za-z_]\w*", top[-1]) and top[-1] != "operator":
            j = match_angle(u, j) + 1  # template arguments
            continue
        if t in ("(", "["):
            close = match_close(u, j, t, ")" if t == "(" else "]")
            if t == "(" and (not top or top[-1] not in _NOT_A_CALL):
                top.append("(")  # a parameter list: this brace opens a function body
            j = close + 1
            continue
        top.append(t)
        j += 1
    if "namespace" in top:
        rest = top[top.index("namespace") + 1 :]
        return "ns", "".join(rest) or None
    if top[:1] == ["extern"]:
        return "ns", None
    if any(t == "=" and (i == 0 or top[i - 1] != "operator") for i, t in enumerate(top)):
        return "init", None
    if "(" in top:
        return "body", None
    if any(w in top for w in _CLASS_KEYS):
        return "class", None
    if top and re.fullmatch(r"[A-Za-z_]\w*|\]", top[-1]):
        return "init", None  # `T x{...}`: a braced initializer
    return "body", None


def split_top(u: Unit, lo: int, hi: int, attr_at: dict) -> list[list[int]]:
    """Split sig positions [lo, hi) at top-level commas (outside (), [], {}, <> and attributes)."""
    parts: list[list[int]] = [[]]
    depth = 0
    k = lo
    while k < hi:
        if k in attr_at:
            end = attr_at[k][0]
            parts[-1].extend(range(k, end + 1))
            k = end + 1
            continue
        t = u.toks[u.sig[k]].text
        if t in ("(", "[", "{", "<"):
            depth += 1
        elif t in (")", "]", "}", ">"):
            depth -= 1
        elif t == ">>":
            depth -= 2
        if t == "," and depth == 0:
            parts.append([])
        else:
            parts[-1].append(k)
        k += 1
    return [p for p in parts if p]
