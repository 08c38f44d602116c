"""The rewrites C++ cannot express otherwise, each kept on its original .metal line: threadgroup
variables, function constants, half literals and converting vector casts."""

from __future__ import annotations

import re

from .msl_parse import Unit, err, int_expr, match_angle, match_close


def function_constants(u: Unit, attr_at: dict, kinds: list[str], rewrite: bool) -> dict[str, str]:
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
        start = k  # only a declaration statement, not a `constant T&` kernel parameter
        while start > 0 and u.toks[s[start - 1]].orig in ("constexpr", "static", "const", "inline"):
            start -= 1
        if start > 0 and u.toks[s[start - 1]].orig not in (";", "{", "}"):
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
        type_text = " ".join(
            u.toks[s[j]].orig
            for j in decl[:-1]
            if u.toks[s[j]].orig not in ("constexpr", "static", "inline")
        )
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
            value = int_expr(fc_attr)
            if value is None or not 0 <= value < 65536:
                raise err(u.toks[s[k]], f"function constant index '{fc_attr}' is not an integer")
            fc_attr = str(value)
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
        _rewrite_fc_uses(u, 0, len(s), index, subst, skip_attrs=attr_at, kinds=kinds)
    return index


_NOT_A_TYPE = {"return", "case", "else", "do", "sizeof", "alignof", "throw", "co_return", "goto"}


def _rewrite_fc_uses(
    u: Unit, lo: int, hi: int, index: dict, subst: dict, skip_attrs=None, kinds=None
) -> None:
    """Replace uses of function constants in [lo, hi), except where a local variable or a
    parameter of the same name shadows them (MLX names parameters like its constants)."""
    s = u.sig
    in_attr = set()
    for a, (e, _) in (skip_attrs or {}).items():
        in_attr.update(range(a, e + 1))
    scopes: list[set] = [set()]
    pending: set = set()  # parameters: they shadow in the body that follows
    paren = 0
    for j in range(lo, hi):
        t = u.toks[s[j]]
        o = t.orig
        if o == "{":
            scopes.append(pending if paren == 0 else set())
            pending = set()
        elif o == "}":
            if len(scopes) > 1:
                scopes.pop()
        elif o == "(":
            paren += 1
        elif o == ")":
            paren = max(0, paren - 1)
        elif o == ";" and paren == 0:
            pending = set()
        if t.shim or j in in_attr or t.text != t.orig:
            continue
        prev = u.toks[s[j - 1]].orig if j else ""
        if o == "is_function_constant_defined" and u.toks[s[j + 1]].orig == "(":
            arg = u.toks[s[j + 2]]
            if arg.orig in index:
                t.text = "__msim_function_constant_defined"
                arg.text = index[arg.orig]
        elif o in subst and prev not in (".", "->", "::"):
            nxt = u.toks[s[j + 1]].orig if j + 1 < len(s) else ";"
            # `int name =`, `const bool name)`: a declaration (a type name right before).
            declared = re.fullmatch(r"[A-Za-z_]\w*", prev) and prev not in _NOT_A_TYPE
            # `constant int& name` in a function's parameter list (outside any body)
            in_params = paren > 0 and kinds is not None and kinds[j] in ("ns", "class")
            declared = declared or (in_params and prev in ("*", "&", "&&"))
            if declared and nxt in ("=", ";", ",", ")", "[", "{", ":"):
                (pending if paren > 0 else scopes[-1]).add(o)
                continue
            if any(o in sc for sc in scopes):
                continue
            t.text = subst[o]


_DECL_SPECS = ("const", "volatile", "static", "constexpr", "inline", "__msim_thread")


def _enclosing_opener(u: Unit, k: int) -> str:
    """The unmatched bracket ('(', '<', '[', '{') or ';' that encloses sig position k."""
    s = u.sig
    depth = 0
    for j in range(k - 1, -1, -1):
        t = u.toks[s[j]].orig
        if t in (")", "]", ">", "}"):
            depth += 1
        elif t == ">>":
            depth += 2
        elif t in ("(", "[", "<", "{"):
            if depth == 0:
                return t
            depth -= 1
        elif t == ";" and depth == 0:
            return ";"
    return ";"


def _declarators(u: Unit, lo: int, end: int) -> list[tuple[int, bool]]:
    """(first sig position, is an object) of each declarator in [lo, end): a declarator that
    starts with '*', '&' or '&&' declares a pointer or reference, not storage."""
    s = u.sig
    out = []
    depth = 0
    start = lo
    for j in range(lo, end + 1):
        t = u.toks[s[j]].orig if j < end else ","
        if t in ("(", "[", "{", "<"):
            depth += 1
        elif t in (")", "]", "}", ">"):
            depth -= 1
        elif t == ">>":
            depth -= 2
        if depth == 0 and t == ",":
            if start < j:
                out.append((start, u.toks[s[start]].orig not in ("*", "&", "&&")))
            start = j + 1
    return out


def rewrite_threadgroup_vars(u: Unit, kinds: list[str], attr_at: dict | None = None) -> None:
    """`threadgroup T a[N], b;` in a function body -> references to per-threadgroup storage.

    Every other place a threadgroup *object* (not a pointer or reference) could be declared is a
    build error naming the line: msim would otherwise compile it as ordinary per-thread memory,
    a different program from the one the GPU runs.
    """
    s = u.sig
    attr_at = attr_at or {}
    in_attr = {j for a, (e, _) in attr_at.items() for j in range(a, e + 1)}
    counter = 0
    for k in range(len(s)):
        t = u.toks[s[k]]
        if t.orig != "__msim_threadgroup" or t.shim or k in in_attr:
            continue
        start = k  # walk back over decl-specifiers and attributes to the statement start
        while start > 0 and (u.toks[s[start - 1]].orig in _DECL_SPECS or start - 1 in in_attr):
            start -= 1
        prev = u.toks[s[start - 1]].orig if start else ";"
        end = k  # the ';' ending the statement, or the '{' of a function body
        while end < len(s) and u.toks[s[end]].orig != ";":
            tt = u.toks[s[end]].orig
            if tt == "{" and u.toks[s[end - 1]].orig == ")":
                break
            if tt in ("(", "[", "{"):
                end = match_close(u, end, tt, {"(": ")", "[": "]", "{": "}"}[tt])
            end += 1
        # The type ends where the first declarator begins: an identifier followed by '[', ',',
        # ';', '=', '{' or ')' at depth 0, or a '*' / '&' (pointer or reference declarator).
        decl_start = None
        depth = 0
        for j in range(k + 1, end):
            tt = u.toks[s[j]].orig
            if depth == 0 and tt in ("*", "&", "&&"):
                decl_start = j
                break
            depth += {"<": 1, ">": -1, ">>": -2, "(": 1, ")": -1}.get(tt, 0)
            nxt = u.toks[s[j + 1]].orig if j + 1 < len(s) else ";"
            if (
                depth == 0
                and re.fullmatch(r"[A-Za-z_]\w*", tt)
                and nxt in ("[", ",", ";", "=", "{", ")")
            ):
                if tt not in _DECL_SPECS:
                    decl_start = j
                    break
        if prev not in (";", "{", "}", ":", "typedef"):
            # A type inside an expression, a parameter list or template arguments.
            if _enclosing_opener(u, start) == "<" and not _is_indirect(u, k, len(s)):
                raise err(
                    t,
                    "msim cannot model a threadgroup-qualified object type as a template "
                    "argument (storage declared through it would be per-thread memory); pass a "
                    "threadgroup pointer instead",
                )
            if (
                prev == "="
                and _statement_head(u, start) == "using"
                and not _is_indirect(u, k, len(s))
            ):
                raise err(t, _ALIAS_MSG)
            continue
        if decl_start is None:
            continue
        decls = _declarators(u, decl_start, end)
        objects = [d for d in decls if d[1]]
        if not objects:
            continue  # threadgroup pointers or references: a qualifier, not storage
        if prev == "typedef":
            raise err(t, _ALIAS_MSG)
        if len(objects) != len(decls):
            raise err(
                t, "declare threadgroup pointers and threadgroup variables in separate statements"
            )
        if kinds[k] != "body":
            where = {"ns": "at program scope", "class": "as a struct or class member"}
            raise err(
                t,
                f"threadgroup variable declared {where.get(kinds[k], 'inside an initializer')}: "
                "MSL allows threadgroup variables only inside functions (msim would give each "
                "thread its own copy)",
            )
        if u.toks[s[end]].orig != ";":
            raise err(t, "unexpected '{' in a threadgroup variable declaration")
        if u.in_kernel and not u.in_kernel[k]:
            raise err(
                t,
                "threadgroup variable declared in a function that is not a kernel: MSL "
                "allocates threadgroup variables in kernel functions only; declare it in the "
                "kernel and pass a threadgroup pointer",
            )
        type_text = " ".join(u.toks[s[j]].text for j in range(start, decl_start))
        pieces = []
        for name_pos, dims, init in _split_declarators(u, decl_start, end):
            vname = u.toks[s[name_pos]].text
            if init:
                raise err(t, f"threadgroup variable '{vname}' cannot have an initializer")
            if "static" in type_text.split():
                raise err(t, f"threadgroup variable '{vname}' cannot be static")
            key = f"__msim_tgk{counter}"
            counter += 1
            ptr = f"{type_text} (*){dims}" if dims else f"{type_text} *"
            obj = f"{type_text.replace('__msim_threadgroup', '')} {dims}"
            pieces.append(
                f"static char {key}; auto& {vname} = *({ptr})__msim_tg_var(&{key}, "
                f"sizeof({obj}), alignof({obj}), __FILE__, __LINE__);"
            )
        for j in range(start, end + 1):
            u.blank(s[j])
        u.toks[s[start]].text = " ".join(pieces)


_ALIAS_MSG = (
    "msim cannot model a typedef or alias of a threadgroup object type (variables declared "
    "through it would be per-thread memory); write `threadgroup` in the variable declaration"
)


def _is_indirect(u: Unit, k: int, n: int) -> bool:
    """Whether the type starting at sig position k is a pointer or reference type."""
    s = u.sig
    depth = 0
    for j in range(k + 1, n):
        tt = u.toks[s[j]].orig
        if depth == 0 and tt in ("*", "&", "&&"):
            return True
        if tt in ("(", "[", "<"):
            depth += 1
        elif tt in (")", "]", ">", ">>"):
            depth -= 2 if tt == ">>" else 1
            if depth < 0:
                return False
        elif depth == 0 and tt in (",", ";", "{", "="):
            return False
    return False


def _statement_head(u: Unit, k: int) -> str:
    """First token of the statement containing sig position k."""
    s = u.sig
    j = k
    while j > 0 and u.toks[s[j - 1]].orig not in (";", "{", "}"):
        j -= 1
    return u.toks[s[j]].orig


def _split_declarators(u: Unit, lo: int, end: int) -> list[tuple[int, str, bool]]:
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


_FLOAT_LIT = re.compile(
    r"(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|0[xX][\da-fA-F.]+[pP][+-]?\d+"
)
_VECTOR_NAMES = {
    f"{p}{t}{n}"
    for t in (
        "float",
        "half",
        "bfloat",
        "int",
        "uint",
        "short",
        "ushort",
        "char",
        "uchar",
        "long",
        "ulong",
        "bool",
    )
    for n in (2, 3, 4)
    for p in ("", "packed_")
}
# Tokens after which `(NAME)` cannot be a cast: it is an argument list or a declarator.
_CALL_PREV = {"sizeof", "alignof", "decltype", "alignas", "__attribute__", "noexcept", "operator"}
_KEYWORDS_BEFORE_EXPR = {"return", "case", "else", "do"}
_PREFIX_OPS = {"-", "+", "!", "~", "*", "&", "++", "--"}


def _type_aliases(u: Unit) -> set[str]:
    """Names declared by `typedef ... N;` or `using N = ...;` (alias templates too), user code."""
    s = u.sig
    names = set()
    for k in range(len(s) - 2):
        t = u.toks[s[k]]
        if t.shim or t.orig not in ("typedef", "using"):
            continue
        if t.orig == "using":
            if u.toks[s[k + 2]].orig == "=" and re.fullmatch(
                r"[A-Za-z_]\w*", u.toks[s[k + 1]].orig
            ):
                names.add(u.toks[s[k + 1]].orig)
            continue
        j, depth, last = k + 1, 0, None
        while j < len(s) and not (depth == 0 and u.toks[s[j]].orig == ";"):
            tt = u.toks[s[j]].orig
            if tt in ("(", "[", "{", "<"):
                depth += 1
            elif tt in (")", "]", "}", ">"):
                depth -= 1
            elif tt == ">>":
                depth -= 2
            elif re.fullmatch(r"[A-Za-z_]\w*", tt) and depth <= 1:
                last = tt  # `typedef T name;` or `typedef T (*name)(...)`
            j += 1
        if last:
            names.add(last)
    return names


def _template_params(u: Unit) -> list[frozenset]:
    """Template type parameters in scope at every sig position (from `template <typename T>` to
    the end of the declaration it introduces)."""
    s = u.sig
    n = len(s)
    out: list[frozenset] = [frozenset()] * n
    stack: list[tuple[int, frozenset]] = []  # (last position in scope, names in scope)
    k = 0
    while k < n:
        while stack and stack[-1][0] < k:
            stack.pop()
        t = u.toks[s[k]]
        if not t.shim and t.orig == "template" and k + 1 < n and u.toks[s[k + 1]].orig == "<":
            close = match_angle(u, k + 1)
            names = set()
            for j in range(k + 2, close):
                if u.toks[s[j]].orig in ("typename", "class") and j + 1 < close:
                    nxt = u.toks[s[j + 1]].orig
                    after = u.toks[s[j + 2]].orig if j + 2 <= close else ">"
                    if re.fullmatch(r"[A-Za-z_]\w*", nxt) and after in (",", ">", "=", "...", ">>"):
                        names.add(nxt)
            end = close + 1
            while end < n:
                tt = u.toks[s[end]].orig
                if tt in ("(", "["):
                    end = match_close(u, end, tt, ")" if tt == "(" else "]")
                elif tt == "{":
                    end = match_close(u, end, "{", "}")
                    break
                elif tt == ";":
                    break
                end += 1
            outer = stack[-1][1] if stack else frozenset()
            stack.append((end, outer | names))
        out[k] = stack[-1][1] if stack else frozenset()
        k += 1
    return out


def _cast_type_end(u: Unit, k: int, types) -> int | None:
    """If sig position k is the '(' of a C-style cast to a type that may be a vector, the
    position of its ')'; else None."""
    s = u.sig
    j = k + 1
    if j < len(s) and u.toks[s[j]].orig == "const":
        j += 1
    if j + 1 < len(s) and u.toks[s[j]].orig == "metal" and u.toks[s[j + 1]].orig == "::":
        j += 2
    if j >= len(s):
        return None
    name = u.toks[s[j]].orig
    if name == "vec" or name in types:
        if j + 1 < len(s) and u.toks[s[j + 1]].orig == "<":
            j = match_angle(u, j + 1)
        if j + 1 < len(s) and u.toks[s[j + 1]].orig == ")":
            return j + 1
    return None


def _operand_end(u: Unit, j: int, types) -> int:
    """Last sig position of the cast-expression (unary operand) starting at j."""
    s = u.sig
    n = len(s)
    while j < n and u.toks[s[j]].orig in _PREFIX_OPS:
        j += 1
    t = u.toks[s[j]].orig
    if t in ("sizeof", "alignof"):
        if u.toks[s[j + 1]].orig == "(":
            return match_close(u, j + 1, "(", ")")
        return _operand_end(u, j + 1, types)
    if t == "(":
        inner = _cast_type_end(u, j, types)
        if inner is not None:
            return _operand_end(u, inner + 1, types)
        j = match_close(u, j, "(", ")")
    else:
        if t == "::":
            j += 1
        while True:  # a possibly qualified name, with template arguments before '(' or '::'
            if u.toks[s[j]].orig == "template":
                j += 1
            if (
                j + 1 < n
                and u.toks[s[j + 1]].orig == "<"
                and re.fullmatch(r"[A-Za-z_]\w*", u.toks[s[j]].orig)
            ):
                try:
                    close = match_angle(u, j + 1)
                except Exception:
                    close = None
                if (
                    close is not None
                    and close + 1 < n
                    and u.toks[s[close + 1]].orig in ("(", "::", "{")
                ):
                    j = close
            if j + 2 < n and u.toks[s[j + 1]].orig == "::":
                j += 2
                continue
            break
    while j + 1 < n:  # postfix operators
        nxt = u.toks[s[j + 1]].orig
        if nxt in ("[", "(", "{"):
            j = match_close(u, j + 1, nxt, {"[": "]", "(": ")", "{": "}"}[nxt])
        elif nxt in (".", "->") and j + 2 < n:
            j += 2
            if u.toks[s[j]].orig == "template":
                j += 1
        elif nxt in ("++", "--"):
            j += 1
        else:
            break
    return j


def rewrite_exprs(u: Unit, kinds: list[str] | None = None) -> None:
    """Literals and conversions that C++ spells differently from MSL.

    * `1.0h` half literals -> `1.0f16`; unsuffixed floating literals -> float (`0.1` -> `0.1f`):
      MSL has no double, so they are float there, while C++ would compute in double.
    * Every cast that may name a vector type converts element by element, as in MSL, instead of
      clang's silent bit-cast between vectors of equal size: `static_cast<V>(x)`, C-style
      `(V)x` and functional `V(x)` where V is an MSL vector name, `vec<T,N>`, a typedef or
      alias, a template type parameter or `decltype(...)`.
    """
    s = u.sig
    n = len(s)
    kinds = kinds or ["body"] * n
    aliases = _type_aliases(u)
    tparams = _template_params(u)
    for k in range(n):
        t = u.toks[s[k]]
        if t.shim:
            continue
        prev = u.toks[s[k - 1]].orig if k else ";"
        nxt = u.toks[s[k + 1]].orig if k + 1 < n else ";"
        if t.kind == "num":
            m = _HALF_LIT.fullmatch(t.text)
            if m:
                body = m.group(1)
                if not re.search(r"[.eEpP]", body):
                    body += ".0"
                t.text = body + "f16"
            elif _FLOAT_LIT.fullmatch(t.text):
                t.text += "f"
            continue
        if t.kind == "id" and t.text != t.orig:
            continue  # already rewritten (function constants)
        if t.orig == "static_cast" and nxt == "<":
            t.text = "::metal::__msim_cast"
        elif (
            t.orig == "("
            and prev not in _CALL_PREV
            and not re.fullmatch(r"[A-Za-z_]\w*|\)|\]", prev)
        ):
            types = _VECTOR_NAMES | aliases | tparams[k]
            close = _cast_type_end(u, k, types)
            if close is None or close + 1 >= n:
                continue
            after = u.toks[s[close + 1]]
            if not (after.kind in ("id", "num", "chr") or after.orig in _PREFIX_OPS | {"(", "::"}):
                continue
            end = _operand_end(u, close + 1, types)
            t.text = "::metal::__msim_ccast<"
            u.toks[s[close]].text = ">("
            u.toks[s[end]].text += ")"
        elif t.orig == "vec" and nxt == "<" and prev != "operator":
            close = match_angle(u, k + 1)
            if close + 1 < n and u.toks[s[close + 1]].orig == "(":
                t.text = "__make_vec" if prev == "::" else "::metal::__make_vec"
        elif t.orig == "decltype" and nxt == "(" and prev not in ("typedef", "::", ".", "->"):
            close = match_close(u, k + 1, "(", ")")
            if close + 1 < n and u.toks[s[close + 1]].orig == "(" and _expr_context(prev, kinds[k]):
                t.text = "::metal::__msim_fcast<decltype"
                u.toks[s[close]].text += ">"
        elif (
            t.kind == "id"
            and kinds[k] == "body"
            and (t.orig in _VECTOR_NAMES or t.orig in aliases or t.orig in tparams[k])
            and prev in (";", "{", "}", "const", "constexpr")
            and re.fullmatch(r"[A-Za-z_]\w*", nxt)
            and k + 2 < n
            and u.toks[s[k + 2]].orig == "("
            and u.toks[s[k + 3]].orig != ")"
            and _ends_declaration(u, match_close(u, k + 2, "(", ")"))
        ):
            # `short2 offset(a, b);`: direct initialization calls the MSL constructor, which C++
            # would not find for a vector type (ext_vector has none).
            u.toks[s[k + 2]].text = f"= ::metal::__msim_fcast<{t.text}>("
            if t.orig in aliases or t.orig in tparams[k]:
                continue
        elif t.kind == "id" and (t.orig in aliases or t.orig in tparams[k] or t.orig in _PACKED):
            if prev in (
                ".",
                "->",
                "::",
                "~",
                "typedef",
                "struct",
                "class",
                "enum",
                "typename",
                "operator",
            ):
                continue
            if not _expr_context(prev, kinds[k]) or prev in _TYPE_PREFIXES:
                continue
            if nxt == "(" and _is_declarator(u, k + 1):
                continue  # `T (&a)[N]`, `T (*f)(int)`: a declaration, not a cast
            if nxt == "(":
                t.text = f"::metal::__msim_fcast<{t.text}>"
            elif nxt == "<" and t.orig in aliases:
                close = match_angle(u, k + 1)
                if close + 1 < n and u.toks[s[close + 1]].orig == "(":
                    t.text = f"::metal::__msim_fcast<{t.text}"
                    u.toks[s[close]].text += ">"


_PACKED = {v for v in _VECTOR_NAMES if v.startswith("packed_")}


_TYPE_PREFIXES = {
    "const",
    "volatile",
    *("__msim_" + a for a in ("device", "constant", "threadgroup", "thread")),
}


def _is_declarator(u: Unit, k: int) -> bool:
    """Whether the '(' at sig position k opens a parenthesized declarator `(&a)`, `(*a)`
    followed by `[` or `(`."""
    s = u.sig
    if k + 3 >= len(s) or u.toks[s[k + 1]].orig not in ("&", "*", "&&"):
        return False
    if not re.fullmatch(r"[A-Za-z_]\w*", u.toks[s[k + 2]].orig) or u.toks[s[k + 3]].orig != ")":
        return False
    return k + 4 < len(s) and u.toks[s[k + 4]].orig in ("[", "(")


def _ends_declaration(u: Unit, close: int) -> bool:
    return close + 1 < len(u.sig) and u.toks[u.sig[close + 1]].orig in (";", ",")


def _expr_context(prev: str, kind: str) -> bool:
    """Whether a name after `prev` starts an expression (not a declaration or a constructor's
    member initializer)."""
    if prev in (";", "{", "}"):
        return False  # statement start: a declaration such as `T (x);` or `T (*f)()`
    if prev in (":", ",") and kind != "body":
        return False  # a constructor's member initializer list
    return True


_AS_MARKERS = ("__msim_device", "__msim_constant", "__msim_threadgroup", "__msim_thread")


def dedupe_address_space_overloads(u: Unit, kinds: list[str]) -> None:
    """Functions overloaded only on address spaces (`T load() const device` next to `... const
    thread`, `operator+=(thread complex_t&)` next to `(device complex_t&)`, as MLX writes them)
    redeclare each other once msim maps every address space to one (outside strict mode).
    Identical bodies keep the first; different bodies are a build error (msim could not tell
    which one the GPU would call). Address-space qualifiers of member functions are dropped:
    `constant` would otherwise read as `const`, which a constructor cannot carry."""
    s = u.sig
    n = len(s)
    seen: dict[tuple, str] = {}
    stack: list[int] = []  # positions of the open braces
    stmt_start = 0
    k = 0

    def keep_first(body_start: int, body_end: int, blank_end: int, what: str) -> None:
        # The first of several definitions that differ only in address spaces stays; later
        # identical ones are blanked (stmt_start..blank_end), different ones are an error.
        key = (stack[-1] if stack else -1, _plain(u, stmt_start, body_start))
        body = _plain(u, body_start, body_end + 1)
        if key not in seen:
            seen[key] = body
            return
        if seen[key] != body:
            raise err(u.toks[s[k]], f"msim cannot model {what}")
        for x in range(stmt_start, blank_end + 1):
            u.blank(s[x])

    while k < n:
        t = u.toks[s[k]].orig
        if t == "{" and kinds[k] in ("class", "ns") and _is_as_specialization(u, stmt_start, k):
            # `template <class T> struct S<device T*> {...};` next to `S<thread T*>`
            end = match_close(u, k, "{", "}")
            stop = end + 1 if end + 1 < n and u.toks[s[end + 1]].orig == ";" else end
            keep_first(
                k,
                end,
                stop,
                "specializations that differ only in address spaces and define different members",
            )
            k = stop + 1
            stmt_start = k
            continue
        if t == "{":
            stack.append(k)
            stmt_start = k + 1
        elif t == "}":
            if stack:
                stack.pop()
            stmt_start = k + 1
        elif t == ";":
            stmt_start = k + 1
        elif t == ":" and k > 0 and u.toks[s[k - 1]].orig in ("public", "private", "protected"):
            stmt_start = k + 1
        elif t == "(" and kinds[k] in ("class", "ns") and not u.toks[s[k]].shim:
            close = match_close(u, k, "(", ")")
            j = close + 1
            while j < n and u.toks[s[j]].orig not in ("{", ";", "=", "->", ":", "(", ","):
                if kinds[k] == "class" and u.toks[s[j]].orig in _AS_MARKERS:
                    u.blank(s[j])  # a member function's address-space qualifier
                j += 1
            if j < n and u.toks[s[j]].orig == "->":  # trailing return type
                while j < n and u.toks[s[j]].orig not in ("{", ";"):
                    j += 1
            if j < n and u.toks[s[j]].orig == ":" and kinds[k] == "class":
                j = _skip_member_initializers(u, j + 1)
            if j >= n or u.toks[s[j]].orig != "{":
                k = close + 1
                continue
            end = match_close(u, j, "{", "}")
            head = [u.toks[s[x]].orig for x in range(stmt_start, j)]
            if any(h in _AS_MARKERS for h in head):
                keep_first(
                    j,
                    end,
                    end,
                    "functions that differ only in address spaces and do different things",
                )
            stmt_start = end + 1
            k = end + 1
            continue
        k += 1


def _is_as_specialization(u: Unit, lo: int, hi: int) -> bool:
    """Whether [lo, hi) heads a class template specialization whose arguments name an address
    space."""
    head = [u.toks[u.sig[j]].orig for j in range(lo, hi)]
    if not head or head[0] != "template" or not any(w in head for w in ("struct", "class")):
        return False
    if "(" in head:
        return False
    return any(h in _AS_MARKERS for h in head)


def _skip_member_initializers(u: Unit, j: int) -> int:
    """Position of the constructor body's '{' after a member initializer list starting at j."""
    s = u.sig
    n = len(s)
    while j < n:
        while j < n and u.toks[s[j]].orig not in ("(", "{"):
            j += 1  # the member or base name
        if j >= n:
            return j
        j = match_close(u, j, u.toks[s[j]].orig, ")" if u.toks[s[j]].orig == "(" else "}") + 1
        if j < n and u.toks[s[j]].orig == "...":
            j += 1
        if j < n and u.toks[s[j]].orig == ",":
            j += 1
            continue
        return j
    return j


def _plain(u: Unit, lo: int, hi: int) -> str:
    return " ".join(
        u.toks[u.sig[j]].orig for j in range(lo, hi) if u.toks[u.sig[j]].orig not in _AS_MARKERS
    )
