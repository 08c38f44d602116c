"""Kernel signatures: which declarations are dispatchable, their host names and how each
parameter binds (buffer index, threadgroup index or thread-position attribute)."""

from __future__ import annotations

import dataclasses
import re

from .msl_parse import MARKERS, GenError, Unit, err, int_expr, match_angle, match_close, split_top

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


_AUTO_KIND = {"device": "buffer", "constant": "buffer", "threadgroup": "threadgroup"}


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
    inst_span: tuple[int, int] | None = None  # sig positions of an explicit instantiation


def _parse_param(u: Unit, pos: list[int], attr_at: dict) -> tuple:
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


def find_kernels(
    u: Unit, attr_at: dict, kinds: list[str], paths: list, fc_index: dict | None = None
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
                    if u.toks[s[stmt_start]].text == "template" and t.text == ";":
                        kern.inst_span = (stmt_start, k)
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
        k = match_angle(u, lo + 1) + 1
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
        if tt in ("decltype", "__attribute__", "alignas") and u.toks[s[k + 1]].text == "(":
            k = match_close(u, k + 1, "(", ")") + 1  # a type, not the parameter list
            continue
        if tt == "<" and k > lo and re.fullmatch(r"\w+", u.toks[s[k - 1]].text):
            k = match_angle(u, k) + 1
            continue
        if tt == "(":
            paren = k
            break
        k += 1
    is_kernel = has_kernel_kw or any(a[0] == "kernel" for a in outer_attrs)
    if paren is None and not is_inst:
        if is_kernel or any(a[0] == "host_name" for a in outer_attrs):
            raise err(u.toks[s[lo]], "msim cannot parse this kernel declaration")
        return None
    # Name (plus template arguments for instantiations) right before '(', or before ';' for an
    # instantiation through a function type: `template [[host_name("x")]] kernel kernel_t f<T>;`
    # where `typedef decltype(f<float>) kernel_t;` (or `decltype(f<T>) f<T>;` as MLX writes it).
    name_end = (paren if paren is not None else hi) - 1
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
    scope = list(ns_path)
    q = name_end  # an explicitly qualified name: `template ... void ns::k<float>(...)`
    while (
        q - 2 >= lo
        and u.toks[s[q - 1]].text == "::"
        and re.fullmatch(r"\w+", u.toks[s[q - 2]].text)
    ):
        scope.insert(len(ns_path), u.toks[s[q - 2]].text)
        q -= 2
    qual = "::" + "::".join(scope + [name])
    if is_inst and not is_kernel and qual in templates:
        is_kernel = True
    if not is_kernel:
        return None
    for a in outer_attrs:
        if a[0] in UNSUPPORTED_ATTRS:
            raise err(a[2], f"msim does not support {UNSUPPORTED_ATTRS[a[0]]}")
    params = []
    if paren is None:  # instantiated through a function type: the definition's parameters
        if not targs or qual not in templates:
            raise err(name_tok, f"msim cannot find the kernel template '{name}' instantiated here")
        params = [(b[0], b[1], b[2], b[3], b[4]) for b in templates[qual]]
    else:
        close = match_close(u, paren, "(", ")")
        for part in split_top(u, paren + 1, close, attr_at):
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
            max_threads = int_expr(a[1]) or 0
    if is_inst:
        if not any(a[0] == "host_name" for a in outer_attrs):
            raise err(name_tok, f"explicit kernel instantiation of '{name}' needs [[host_name]]")
        if qual in templates and all(not p[0] for p in params):
            base = templates[qual]
            if len(base) != len(params):
                raise err(name_tok, f"instantiation of '{name}' has a different parameter count")
            params = [(b[0], p[1], p[2] or b[2], p[3], p[4]) for b, p in zip(base, params)]
    out = []
    used: dict[tuple, str] = {}
    # Metal numbers buffer (and threadgroup) parameters without an index attribute in
    # declaration order, taking the lowest index no attributed parameter uses.
    taken = {
        (a_name, int_expr(a_arg))
        for attrs, *_ in params
        for a_name, a_arg, _ in attrs
        if a_name in ("buffer", "threadgroup")
    }
    for attrs, type_text, pname, passing, space in params:
        label = pname or "<unnamed>"
        binding = None
        cond = ""
        for a_name, a_arg, a_tok in attrs:
            if a_name == "function_constant":
                cond = fc_index.get(a_arg.strip(), a_arg.strip())
                if not cond.isdigit():  # the attribute names the constant, not its index
                    raise err(a_tok, f"'{a_arg.strip()}' is not a function constant")
            if a_name in UNSUPPORTED_ATTRS:
                raise err(a_tok, f"msim does not support {UNSUPPORTED_ATTRS[a_name]}")
            if a_name in ("buffer", "threadgroup"):
                value = int_expr(a_arg)
                if value is None:
                    raise err(a_tok, f"[[{a_name}({a_arg})]]: the index is not an integer")
                binding = Param(a_name, str(value), space, type_text, label, passing)
            elif a_name in ID_ATTRS:
                binding = Param("id", a_name, space, type_text, label, passing)
        if binding is None and passing in ("ptr", "ref") and space in _AUTO_KIND:
            kind = _AUTO_KIND[space]
            index = next(i for i in range(64) if (kind, i) not in taken)
            taken.add((kind, index))
            binding = Param(kind, str(index), space, type_text, label, passing)
        if binding is None:
            raise err(
                name_tok,
                f"parameter '{label}' of kernel '{host}' needs [[buffer(i)]], [[threadgroup(i)]]"
                " or a thread-position attribute (only device, constant and threadgroup pointers"
                " and references are numbered automatically)",
            )
        binding.cond = cond
        if binding.kind != "id":
            key = (binding.kind, binding.index)
            if key in used:
                raise err(name_tok, f"kernel '{host}': [[{key[0]}({key[1]})]] bound twice")
            used[key] = label
            if binding.kind == "buffer" and int(binding.index) >= 31:
                raise err(name_tok, f"kernel '{host}': buffer index {binding.index} >= 31")
        out.append(binding)
    return Kernel(host, qual + targs, out, name_tok.file, name_tok.line, max_threads)
