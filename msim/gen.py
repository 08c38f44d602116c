"""Generator: turn one preprocessed .metal translation unit into C++ that clang compiles for msim.

Input is the `clang -E` output of a .metal file with the shim on the include path (so macro-made
kernels and instantiations are visible). The generator works on tokens, keeps every rewrite on
its original line (clang diagnostics and __LINE__ still point at the .metal source) and applies
only the rewrites C++ cannot express otherwise:

* `threadgroup T x[N];` at function scope -> storage shared by the simulated threadgroup;
* `[[...]]` attribute lists -> read (buffer indices, thread ids, host names), then blanked;
* `1.0h` half literals -> `1.0f16`; `static_cast<V>` and `vec<T,N>(...)` -> converting casts.

It then appends one trampoline per host name that binds buffers and thread ids by attribute.
"""

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
ID_ATTRS = {
    "thread_position_in_grid": ("thread_position_in_grid", 3),
    "thread_position_in_threadgroup": ("thread_position_in_threadgroup", 3),
    "threadgroup_position_in_grid": ("threadgroup_position_in_grid", 3),
    "threads_per_threadgroup": ("threads_per_threadgroup", 3),
    "dispatch_threads_per_threadgroup": ("threads_per_threadgroup", 3),
    "threadgroups_per_grid": ("threadgroups_per_grid", 3),
    "threads_per_grid": ("threads_per_grid", 3),
    "grid_size": ("threads_per_grid", 3),
    "thread_index_in_threadgroup": ("thread_index_in_threadgroup", 1),
    "thread_index_in_simdgroup": ("thread_index_in_simdgroup", 1),
    "simdgroup_index_in_threadgroup": ("simdgroup_index_in_threadgroup", 1),
    "threads_per_simdgroup": ("threads_per_simdgroup", 1),
    "thread_execution_width": ("threads_per_simdgroup", 1),
    "simdgroups_per_threadgroup": ("simdgroups_per_threadgroup", 1),
    "dispatch_simdgroups_per_threadgroup": ("simdgroups_per_threadgroup", 1),
    "thread_index_in_quadgroup": ("thread_index_in_quadgroup", 1),
    "quadgroup_index_in_threadgroup": ("quadgroup_index_in_threadgroup", 1),
}
UNSUPPORTED_ATTRS = {
    "stage_in": "stage_in inputs",
    "texture": "textures",
    "sampler": "samplers",
    "grid_origin": "grid_origin",
}


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


@dataclasses.dataclass
class Param:
    kind: str  # buffer | threadgroup | id
    index: str  # binding index, or the id attribute name
    space: str
    type: str
    name: str
    passing: str  # ptr | ref | val
    cond: str = ""  # function constant index that makes this parameter exist, if any


@dataclasses.dataclass
class Kernel:
    host_name: str
    call: str  # qualified function name with template arguments
    params: list
    file: str
    line: int
    max_threads: int = 0


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


def _err(tok: Tok, msg: str) -> GenError:
    return GenError(f"{tok.file}:{tok.line}: error: {msg}")


class _Unit:
    """Token stream plus the structural facts both rewrites and kernel parsing need."""

    def __init__(self, toks: list[Tok]):
        self.toks = toks
        self.sig = [i for i, t in enumerate(toks) if t.kind not in ("ws", "dir")]

    def text(self, idxs) -> str:
        return " ".join(self.toks[i].text for i in idxs)

    def blank(self, i: int) -> None:
        self.toks[i].text = " " * len(self.toks[i].text)


def _match_close(u: _Unit, k: int, open_: str, close: str) -> int:
    """Position in u.sig of the bracket closing the one at u.sig[k]."""
    depth = 0
    for j in range(k, len(u.sig)):
        t = u.toks[u.sig[j]].text
        if t == open_:
            depth += 1
        elif t == close:
            depth -= 1
            if depth == 0:
                return j
    raise _err(u.toks[u.sig[k]], f"unbalanced '{open_}'")


def _match_angle(u: _Unit, k: int) -> int:
    """Closing '>' of a template argument list starting at u.sig[k] == '<'."""
    depth = 0
    j = k
    while j < len(u.sig):
        t = u.toks[u.sig[j]].text
        if t in ("(", "["):
            j = _match_close(u, j, t, ")" if t == "(" else "]")
        elif t == "<":
            depth += 1
        elif t == ">":
            depth -= 1
        elif t == ">>":
            depth -= 2
        if depth <= 0:
            return j
        j += 1
    raise _err(u.toks[u.sig[k]], "unbalanced '<'")


def _attr_lists(u: _Unit):
    """Yield (start, end) sig positions of every `[[ ... ]]` in user (non-shim) code."""
    k = 0
    s = u.sig
    while k + 1 < len(s):
        a, b = u.toks[s[k]], u.toks[s[k + 1]]
        if a.text == "[" and b.text == "[" and not a.shim:
            end = _match_close(u, k, "[", "]")
            yield k, end
            k = end + 1
        else:
            k += 1


def _parse_attrs(u: _Unit, start: int, end: int) -> list[tuple[str, str, Tok]]:
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
            close = _match_close(u, k + 1, "(", ")")
            arg = "".join(u.toks[u.sig[j]].text for j in range(k + 2, close))
            k = close + 1
        else:
            k += 1
        name = MARKERS.get(name, name).replace("__msim_", "")
        out.append((name, arg, t))
    return out


def _scope_kinds(u: _Unit, attr_at: dict) -> tuple[list[str], list[list[str]]]:
    """Innermost scope kind ('ns', 'class', 'body', 'init') and namespace path per sig position."""
    kinds: list[str] = []
    paths: list[list[str]] = []
    stack: list[tuple[str, str | None]] = [("ns", None)]
    stmt_start = 0
    k = 0
    s = u.sig
    while k < len(s):
        if k in attr_at:  # attribute lists never open scopes
            end = attr_at[k][0]
            for _ in range(k, end + 1):
                kinds.append(stack[-1][0])
                paths.append([n for kind, n in stack if kind == "ns" and n])
            k = end + 1
            continue
        t = u.toks[s[k]].text
        kinds.append(stack[-1][0])
        paths.append([n for kind, n in stack if kind == "ns" and n])
        if t == "{":
            head = [u.toks[s[j]].text for j in range(stmt_start, k)]
            if stack[-1][0] in ("body", "init"):
                kind, name = stack[-1][0], None
            elif "namespace" in head:
                kind = "ns"
                rest = head[head.index("namespace") + 1 :]
                name = "".join(rest) or None
            elif head[:1] == ["extern"]:
                kind, name = "ns", None
            elif "=" in head:
                kind, name = "init", None
            elif "(" in head:
                kind, name = "body", None
            elif any(w in head for w in ("struct", "class", "union", "enum")):
                kind, name = "class", None
            else:
                kind, name = "body", None
            stack.append((kind, name))
            stmt_start = k + 1
        elif t == "}":
            if len(stack) > 1:
                stack.pop()
            stmt_start = k + 1
        elif t == ";":
            stmt_start = k + 1
        k += 1
    return kinds, paths


def _split_top(u: _Unit, lo: int, hi: int, attr_at: dict) -> list[list[int]]:
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


def _parse_param(u: _Unit, pos: list[int], attr_at: dict) -> tuple:
    """(attrs, type tokens, name, passing, address space) of one kernel parameter."""
    attrs = []
    plain: list[int] = []
    k = 0
    while k < len(pos):
        p = pos[k]
        if p in attr_at:
            end = attr_at[p][0]
            attrs.extend(attr_at[p][1])
            while k < len(pos) and pos[k] <= end:
                k += 1
            continue
        plain.append(p)
        k += 1
    texts = [u.toks[u.sig[p]].text for p in plain]
    name = ""
    if len(texts) >= 2 and re.fullmatch(r"[A-Za-z_]\w*", texts[-1]) and texts[-2] != "::":
        name = texts[-1]
        texts = texts[:-1]
    space = ""
    for m, sp in MARKERS.items():
        if m in texts:
            space = sp
    depth = 0
    passing = "val"
    for t in texts:
        depth += t.count("<") - t.count(">")
        if depth == 0 and t in ("*", "&"):
            passing = "ptr" if t == "*" else "ref"
    type_text = " ".join(MARKERS.get(t, t) for t in texts)
    return attrs, type_text, name, passing, space


def _find_kernels(
    u: _Unit, attr_at: dict, kinds: list[str], paths: list, fc_index: dict | None = None
) -> list[Kernel]:
    """Dispatchable kernels: non-template kernel definitions and explicit instantiations."""
    s = u.sig
    templates: dict[str, list] = {}
    kernels: list[Kernel] = []
    stmt_start = 0
    k = 0
    while k < len(s):
        if k in attr_at:
            k = attr_at[k][0] + 1
            continue
        t = u.toks[s[k]]
        if kinds[k] != "ns":
            if t.text in (";", "{", "}"):
                stmt_start = k + 1
            k += 1
            continue
        if t.text in (";", "{"):
            if not u.toks[s[stmt_start]].shim:
                kern = _parse_decl(u, attr_at, stmt_start, k, paths[k], templates, fc_index or {})
                if kern:
                    kernels.append(kern)
            stmt_start = k + 1
        elif t.text == "}":
            stmt_start = k + 1
        k += 1
    seen: dict[str, Kernel] = {}
    for kern in kernels:
        if kern.host_name in seen:
            raise GenError(
                f"{kern.file}:{kern.line}: error: host name '{kern.host_name}' already used at "
                f"{seen[kern.host_name].file}:{seen[kern.host_name].line}"
            )
        seen[kern.host_name] = kern
    return kernels


def _parse_decl(u, attr_at, lo, hi, ns_path, templates, fc_index) -> Kernel | None:
    """The kernel declared by sig positions [lo, hi) (hi is its ';' or '{'), if dispatchable."""
    s = u.sig
    texts = [u.toks[s[j]].text for j in range(lo, hi)]
    if not texts:
        return None
    is_template_def = texts[0] == "template" and len(texts) > 1 and texts[1] == "<"
    is_inst = texts[0] == "template" and not is_template_def
    # Find the parameter list: the first '(' outside attributes and template argument lists.
    k = lo
    if is_template_def:
        k = _match_angle(u, lo + 1) + 1
    outer_attrs: list = []
    has_kernel_kw = False
    paren = None
    while k < hi:
        if k in attr_at:
            outer_attrs.extend(attr_at[k][1])
            k = attr_at[k][0] + 1
            continue
        tt = u.toks[s[k]].text
        if tt == "__msim_kernel":
            has_kernel_kw = True
        if tt == "<" and k > lo and re.fullmatch(r"\w+", u.toks[s[k - 1]].text):
            k = _match_angle(u, k) + 1
            continue
        if tt == "(":
            paren = k
            break
        k += 1
    if paren is None:
        return None
    is_kernel = has_kernel_kw or any(a[0] == "kernel" for a in outer_attrs)
    # Name (plus template arguments for instantiations) right before '('.
    name_end = paren - 1
    targs = ""
    if u.toks[s[name_end]].text in (">", ">>"):
        depth = 0
        j = name_end
        while j > lo:
            tt = u.toks[s[j]].text
            depth += {">": 1, ">>": 2, "<": -1}.get(tt, 0)
            if depth == 0:
                break
            j -= 1
        targs = "".join(u.toks[s[x]].text + " " for x in range(j, name_end + 1)).strip()
        name_end = j - 1
    name_tok = u.toks[s[name_end]]
    name = name_tok.text
    qual = "::" + "::".join(ns_path + [name]) if ns_path else "::" + name
    if is_inst and not is_kernel and qual in templates:
        is_kernel = True
    if not is_kernel:
        return None
    for a in outer_attrs:
        if a[0] in UNSUPPORTED_ATTRS:
            raise _err(a[2], f"msim does not support {UNSUPPORTED_ATTRS[a[0]]}")
    close = _match_close(u, paren, "(", ")")
    params = []
    for part in _split_top(u, paren + 1, close, attr_at):
        params.append(_parse_param(u, part, attr_at))
    if is_template_def:
        templates[qual] = params
        return None
    if not is_inst and u.toks[s[hi]].text != "{":
        return None  # a prototype; the definition carries the kernel
    host = name
    max_threads = 0
    for a in outer_attrs:
        if a[0] == "host_name":
            host = "".join(re.findall(r'"((?:\\.|[^"\\])*)"', a[1]))
        elif a[0] == "max_total_threads_per_threadgroup":
            max_threads = int(a[1], 0)
    if is_inst:
        if not any(a[0] == "host_name" for a in outer_attrs):
            raise _err(name_tok, f"explicit kernel instantiation of '{name}' needs [[host_name]]")
        if qual in templates and all(not p[0] for p in params):
            base = templates[qual]
            if len(base) != len(params):
                raise _err(name_tok, f"instantiation of '{name}' has a different parameter count")
            params = [(b[0], p[1], p[2] or b[2], p[3], p[4]) for b, p in zip(base, params)]
    out = []
    used: dict[tuple, str] = {}
    for attrs, type_text, pname, passing, space in params:
        label = pname or "<unnamed>"
        binding = None
        cond = ""
        for a_name, a_arg, a_tok in attrs:
            if a_name == "function_constant":
                cond = fc_index.get(a_arg.strip(), a_arg.strip())
                if not cond.isdigit():
                    raise _err(a_tok, f"'{a_arg.strip()}' is not a function constant")
            if a_name in UNSUPPORTED_ATTRS:
                raise _err(a_tok, f"msim does not support {UNSUPPORTED_ATTRS[a_name]}")
            if a_name in ("buffer", "threadgroup"):
                binding = Param(a_name, str(int(a_arg, 0)), space, type_text, label, passing)
            elif a_name in ID_ATTRS:
                binding = Param("id", a_name, space, type_text, label, passing)
        if binding is None:
            raise _err(
                name_tok,
                f"parameter '{label}' of kernel '{host}' needs [[buffer(i)]], [[threadgroup(i)]]"
                " or a thread-position attribute",
            )
        binding.cond = cond
        if binding.kind != "id":
            key = (binding.kind, binding.index)
            if key in used:
                raise _err(name_tok, f"kernel '{host}': [[{key[0]}({key[1]})]] bound twice")
            used[key] = label
            if binding.kind == "buffer" and int(binding.index) >= 31:
                raise _err(name_tok, f"kernel '{host}': buffer index {binding.index} >= 31")
        out.append(binding)
    return Kernel(host, qual + targs, out, name_tok.file, name_tok.line, max_threads)


def _function_constants(u: _Unit, attr_at: dict, kinds: list[str], rewrite: bool) -> dict[str, str]:
    """Program-scope function constants become per-dispatch lookups; returns name -> index.

    `constant T x [[function_constant(i)]];` is blanked and every later use of `x` reads the
    value set on the encoder. Constants initialised from function constants (`constant bool y =
    !is_function_constant_defined(x);`) are substituted as expressions, so they too are
    evaluated per dispatch instead of once when the library loads.
    """
    s = u.sig
    index: dict[str, str] = {}
    subst: dict[str, str] = {}
    k = 0
    while k < len(s):
        t = u.toks[s[k]]
        if t.shim or t.orig != "__msim_constant" or kinds[k] != "ns":
            k += 1
            continue
        end = k
        while u.toks[s[end]].orig != ";":
            end += 1
        fc_attr = None
        for j in range(k, end):
            if j in attr_at:
                for a_name, a_arg, _ in attr_at[j][1]:
                    if a_name == "function_constant":
                        fc_attr = a_arg.strip()
        plain = [
            j
            for j in range(k + 1, end)
            if not any(a <= j <= attr_at[a][0] for a in attr_at if a <= j)
        ]
        eq = next((j for j in plain if u.toks[s[j]].orig == "="), None)
        decl = plain if eq is None else [j for j in plain if j < eq]
        name_pos = decl[-1] if decl else None
        type_text = " ".join(u.toks[s[j]].orig for j in decl[:-1])
        init_uses_fc = eq is not None and any(
            u.toks[s[j]].orig in index
            or u.toks[s[j]].orig in subst
            or u.toks[s[j]].orig == "is_function_constant_defined"
            for j in plain
            if j > eq
        )
        if fc_attr is None and not init_uses_fc:
            k = end + 1
            continue
        if rewrite:
            _rewrite_fc_uses(u, k, end, index, subst)
        name = u.toks[s[name_pos]].orig
        if fc_attr is not None:
            index[name] = fc_attr
            subst[name] = f"(({type_text})__msim_function_constant({fc_attr}, __FILE__, __LINE__))"
        else:
            init = " ".join(u.toks[s[j]].text for j in plain if j > eq)
            subst[name] = f"(({type_text})({init}))"
        if rewrite:
            for j in range(k, end + 1):
                u.blank(s[j])
        k = end + 1
    if subst and rewrite:
        _rewrite_fc_uses(u, 0, len(s), index, subst, skip_attrs=attr_at)
    return index


def _rewrite_fc_uses(u: _Unit, lo: int, hi: int, index: dict, subst: dict, skip_attrs=None) -> None:
    s = u.sig
    in_attr = set()
    for a, (e, _) in (skip_attrs or {}).items():
        in_attr.update(range(a, e + 1))
    for j in range(lo, hi):
        t = u.toks[s[j]]
        if t.shim or j in in_attr or t.text != t.orig:
            continue
        prev = u.toks[s[j - 1]].orig if j else ""
        if t.orig == "is_function_constant_defined" and u.toks[s[j + 1]].orig == "(":
            arg = u.toks[s[j + 2]]
            if arg.orig in index:
                t.text = "__msim_function_constant_defined"
                arg.text = index[arg.orig]
        elif t.orig in subst and prev not in (".", "->", "::"):
            t.text = subst[t.orig]


def _rewrite_threadgroup_vars(u: _Unit, kinds: list[str]) -> None:
    """`threadgroup T a[N], b;` in a function body -> references to per-threadgroup storage."""
    s = u.sig
    counter = 0
    for k in range(len(s)):
        t = u.toks[s[k]]
        if t.text != "__msim_threadgroup" or t.shim:
            continue
        prev = u.toks[s[k - 1]].orig if k else ";"
        if prev not in (";", "{", "}", ":"):
            continue  # a qualifier inside a cast, parameter or pointer declaration
        if kinds[k] != "body":
            if kinds[k] == "ns":
                raise _err(t, "threadgroup variables are only allowed inside kernel functions")
            continue
        end = k
        while u.toks[s[end]].text != ";":
            end += 1
        # The first identifier followed by '[', ',' or ';' at depth 0 names the first variable.
        depth = 0
        decl_start = None
        for j in range(k + 1, end):
            tt = u.toks[s[j]].text
            depth += {"<": 1, ">": -1, ">>": -2, "(": 1, ")": -1}.get(tt, 0)
            if depth == 0 and tt in ("*", "&"):
                break  # pointer or reference to threadgroup memory: not storage
            nxt = u.toks[s[j + 1]].text
            if depth == 0 and re.fullmatch(r"[A-Za-z_]\w*", tt) and nxt in ("[", ",", ";", "="):
                decl_start = j
                break
        if decl_start is None:
            continue
        type_text = " ".join(u.toks[s[j]].text for j in range(k, decl_start))
        decls = _split_declarators(u, decl_start, end)
        pieces = []
        for name_pos, dims, init in decls:
            vname = u.toks[s[name_pos]].text
            if init:
                raise _err(t, f"threadgroup variable '{vname}' cannot have an initializer")
            key = f"__msim_tgk{counter}"
            counter += 1
            ptr = f"{type_text} (*){dims}" if dims else f"{type_text} *"
            obj = f"{type_text.replace('__msim_threadgroup', '')} {dims}"
            pieces.append(
                f"static char {key}; auto& {vname} = *({ptr})__msim_tg_var(&{key}, "
                f"sizeof({obj}), alignof({obj}), __FILE__, __LINE__);"
            )
        for j in range(k, end + 1):
            u.blank(s[j])
        u.toks[s[k]].text = " ".join(pieces)


def _split_declarators(u: _Unit, lo: int, end: int) -> list[tuple[int, str, bool]]:
    out = []
    s = u.sig
    j = lo
    while j < end:
        name_pos = j
        j += 1
        dims = ""
        init = False
        depth = 0
        while j < end:
            tt = u.toks[s[j]].text
            if tt in ("(", "[", "{"):
                depth += 1
            elif tt in (")", "]", "}"):
                depth -= 1
            if depth == 0 and tt == ",":
                j += 1
                break
            if tt == "=" and depth == 0:
                init = True
            if not init:
                dims += tt
            j += 1
        out.append((name_pos, dims, init))
    return out


_HALF_LIT = re.compile(
    r"(0[xX][\da-fA-F.]+[pP][+-]?\d+|\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)[hH]"
)


def _vector_aliases(u: _Unit) -> set[str]:
    """Names declared as `typedef vec<...> N;` or `using N = vec<...>;` in user code."""
    s = u.sig
    names = set()
    for k in range(len(s) - 3):
        t = u.toks[s[k]]
        if t.shim or t.orig not in ("typedef", "using"):
            continue
        j = k + 1
        if t.orig == "using":
            if u.toks[s[k + 2]].orig != "=":
                continue
            name, j = u.toks[s[k + 1]].orig, k + 3
        if u.toks[s[j]].orig == "metal" and u.toks[s[j + 1]].orig == "::":
            j += 2
        if u.toks[s[j]].orig != "vec" or u.toks[s[j + 1]].orig != "<":
            continue
        close = _match_angle(u, j + 1)
        if t.orig == "typedef":
            name = u.toks[s[close + 1]].orig
        names.add(name)
    return names


def _rewrite_exprs(u: _Unit) -> None:
    """Half literals, static_cast to vectors and vec<T,N>(...) or alias(...) constructors."""
    s = u.sig
    aliases = _vector_aliases(u)
    for k in range(len(s)):
        t = u.toks[s[k]]
        if t.shim:
            continue
        if t.kind == "num":
            m = _HALF_LIT.fullmatch(t.text)
            if m:
                body = m.group(1)
                if not re.search(r"[.eEpP]", body):
                    body += ".0"
                t.text = body + "f16"
        elif t.text == "static_cast" and k + 1 < len(s) and u.toks[s[k + 1]].text == "<":
            t.text = "::metal::__msim_cast"
        elif t.text in aliases and k + 1 < len(s) and u.toks[s[k + 1]].text == "(":
            prev = u.toks[s[k - 1]].orig if k else ""
            if prev not in (".", "->", "::", "typedef", "struct", "class"):
                # Through a vector alias clang would bit-cast (same size) instead of convert.
                t.text = (
                    f"::metal::__make_vec<typename ::metal::__vinfo<{t.text}>::elem, "
                    f"::metal::__vinfo<{t.text}>::n>"
                )
        elif t.text == "vec" and k + 1 < len(s) and u.toks[s[k + 1]].text == "<":
            close = _match_angle(u, k + 1)
            if close + 1 < len(s) and u.toks[s[close + 1]].text == "(":
                qualified = k > 0 and u.toks[s[k - 1]].text == "::"
                t.text = "__make_vec" if qualified else "::metal::__make_vec"


PROLOGUE = """\
// Generated by msim from preprocessed MSL; edit the .metal source instead.
#if defined(MSIM_STRICT)
#define __msim_device __attribute__((address_space(1)))
#define __msim_constant const __attribute__((address_space(2)))
#define __msim_threadgroup __attribute__((address_space(3)))
#else
#define __msim_device
#define __msim_constant const
#define __msim_threadgroup
#endif
#define __msim_thread
#define __msim_kernel
"""

BINDERS = """\
namespace {
// Conversions from raw bindings to whatever parameter type the kernel declares.
struct __msim_bufptr {
  void* p;
  template <class T> operator T*() const { return (T*)p; }
};
struct __msim_bufref {
  void* p;
  template <class T> operator T&() const { return *(T*)p; }
};
struct __msim_bufval {
  void* p;
  template <class T> operator T() const { return *(const T*)p; }
};
struct __msim_id {
  const unsigned* v;
  template <class T> operator T() const {
    using I = ::metal::__vinfo<T>;
    if constexpr (I::n == 1) {
      return (T)v[0];
    } else {
      T r = 0;
      for (int i = 0; i < I::n && i < 3; ++i) r[i] = (typename I::elem)v[i];
      return r;
    }
  }
};
}  // namespace
"""


def _signature(kern: Kernel) -> str:
    return ";".join(f"{p.kind}|{p.index}|{p.space}|{p.type}|{p.name}|{p.cond}" for p in kern.params)


def _emit_trampolines(kernels: list[Kernel]) -> str:
    lines = ['# 1 "<msim-generated>"', BINDERS]
    wrap = {"ptr": "__msim_bufptr", "ref": "__msim_bufref", "val": "__msim_bufval"}
    for i, kern in enumerate(kernels):
        args = []
        for p in kern.params:
            if p.kind == "buffer":
                args.append(f"{wrap[p.passing]}{{L->buffers[{p.index}]}}")
            elif p.kind == "threadgroup":
                args.append(f"{wrap[p.passing]}{{L->threadgroup[{p.index}]}}")
            else:
                field, n = ID_ATTRS[p.index]
                ref = f"I->{field}" if n == 3 else f"&I->{field}"
                args.append(f"__msim_id{{{ref}}}")
        lines.append(
            f"static void __msim_t{i}(const __msim_launch* L, const __msim_ids* I) {{\n"
            f"  (void)L; (void)I;\n  {kern.call}({', '.join(args)});\n}}"
        )
    if kernels:
        lines.append("static const __msim_kernel_desc __msim_kernels[] = {")
        for i, kern in enumerate(kernels):
            lines.append(
                f"  {{{_c_str(kern.host_name)}, __msim_t{i}, {_c_str(_signature(kern))}, "
                f"{_c_str(kern.file)}, {kern.line}, {kern.max_threads}u}},"
            )
        lines.append("};")
        lines.append(
            "__attribute__((constructor)) static void __msim_register_unit() {\n"
            f"  __msim_register(__msim_kernels, {len(kernels)});\n}}"
        )
    return "\n".join(lines) + "\n"


def _c_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def generate(preprocessed: str, shim_dirs: tuple[str, ...]) -> tuple[str, list[Kernel]]:
    """Rewrite one preprocessed .metal unit; returns (C++ source, kernels found)."""
    u = _Unit(tokenize(preprocessed, shim_dirs))
    attr_at = {}
    for start, end in _attr_lists(u):
        attr_at[start] = (end, _parse_attrs(u, start, end))
        for name, _, tok in attr_at[start][1]:
            if name in UNSUPPORTED_ATTRS:
                raise _err(tok, f"msim does not support {UNSUPPORTED_ATTRS[name]}")
    kinds, paths = _scope_kinds(u, attr_at)
    fc_index = _function_constants(u, attr_at, kinds, rewrite=False)
    kernels = _find_kernels(u, attr_at, kinds, paths, fc_index)
    _function_constants(u, attr_at, kinds, rewrite=True)
    _rewrite_threadgroup_vars(u, kinds)
    _rewrite_exprs(u)
    for start, (end, _) in attr_at.items():
        for j in range(start, end + 1):
            u.blank(u.sig[j])
    body = "".join(t.text for t in u.toks)
    return PROLOGUE + body + "\n" + _emit_trampolines(kernels), kernels
