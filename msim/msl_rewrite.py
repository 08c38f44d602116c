"""The rewrites C++ cannot express otherwise, each kept on its original .metal line: threadgroup
variables, function constants, half literals and converting vector casts."""

from __future__ import annotations

import re

from .msl_parse import Unit, err, match_angle


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


def _rewrite_fc_uses(u: Unit, lo: int, hi: int, index: dict, subst: dict, skip_attrs=None) -> None:
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


def rewrite_threadgroup_vars(u: Unit, kinds: list[str]) -> None:
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
                raise err(t, "threadgroup variables are only allowed inside kernel functions")
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
                raise err(t, f"threadgroup variable '{vname}' cannot have an initializer")
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


def _vector_aliases(u: Unit) -> set[str]:
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
        close = match_angle(u, j + 1)
        if t.orig == "typedef":
            name = u.toks[s[close + 1]].orig
        names.add(name)
    return names


def rewrite_exprs(u: Unit) -> None:
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
            close = match_angle(u, k + 1)
            if close + 1 < len(s) and u.toks[s[close + 1]].text == "(":
                qualified = k > 0 and u.toks[s[k - 1]].text == "::"
                t.text = "__make_vec" if qualified else "::metal::__make_vec"
