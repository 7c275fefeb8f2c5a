"""rewrite_einsum_attention: two-input batched ``Einsum`` → ``Transpose`` + ``MatMul``.

The attention of the guided-diffusion family is two einsums, ``bct,bcs->bts`` (scores) and
``bts,bcs->bct`` (weighted values); TensorRT has produced wrong results on these, and a MatMul is
what every runtime runs best.  Any two-operand einsum of the same family is rewritten: each letter
is used once per operand, exactly one letter is summed over (in both operands, not in the output),
each operand has exactly one letter of its own (kept in the output), and all other letters are
batch letters shared by both operands and the output.  The operand order is picked so that the
fewest transposes are needed.

    before:  q[b,c,t] ─┐                            q ─▶ Transpose(0,2,1) ─┐
                       Einsum("bct,bcs->bts") ─▶    k ─────────────────────MatMul ─▶ [b,t,s]
             k[b,c,s] ─┘
    before:  w[b,t,s], v[b,c,s] ─▶ Einsum("bts,bcs->bct")
    after:   v ─────────────────────── MatMul ─▶ [b,c,t]
             w ─▶ Transpose(0,2,1) ────┘

Precondition: none (equations outside the family — ellipsis, repeated letters, several summed
letters, outer products — are left as they are).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ._graph import Names
from ._rules import Skip, apply_rule


def _letters_ok(term: str) -> bool:
    return term.isalpha() and len(set(term)) == len(term)


def plan_einsum(equation: str):
    """How to compute ``equation`` as MatMul, or None when it is outside the family.

    Returns ``(swap, perm_left, perm_right, perm_out)``: when ``swap`` the second operand is the
    MatMul's left input; each perm is a Transpose permutation or None for none.
    """
    plan = _plan(equation)
    return None if isinstance(plan, Skip) else plan


def _plan(equation: str):
    """``plan_einsum``'s plan, or a ``Skip`` saying why ``equation`` is outside the family."""
    eq = equation.replace(" ", "")
    if "." in eq:
        return Skip("equation has an ellipsis")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return Skip("equation does not have two operands")
    if not all(_letters_ok(t) for t in terms):
        return Skip("an operand repeats a letter or has a non-letter index")
    a, b = terms
    if not arrow:
        once = [c for c in sorted(set(a + b)) if (a + b).count(c) == 1]
        out = "".join(once)
    if not (out == "" or _letters_ok(out)) or any(c not in a + b for c in out):
        return Skip("output letters repeat or are not in the operands")
    batch = [c for c in out if c in a and c in b]
    summed = [c for c in a if c in b and c not in out]
    own_a = [c for c in a if c not in b]
    own_b = [c for c in b if c not in a]
    if len(summed) != 1:
        return Skip(f"{len(summed)} summed letters (MatMul sums one)")
    if len(own_a) != 1 or len(own_b) != 1:
        return Skip("an operand does not have exactly one letter of its own")
    if any(c not in out for c in own_a + own_b):
        return Skip("a letter is summed within one operand")  # that would need a ReduceSum
    (k,) = summed

    def perm(term: str, order: list[str]):
        p = [term.index(c) for c in order]
        return None if p == list(range(len(term))) else p

    best = None
    for swap in (False, True):
        left, right = (b, a) if swap else (a, b)
        m, n = (own_b if swap else own_a)[0], (own_a if swap else own_b)[0]
        result = batch + [m, n]
        candidate = (swap, perm(left, batch + [m, k]), perm(right, batch + [k, n]), perm("".join(result), list(out)))
        cost = sum(p is not None for p in candidate[1:])
        if best is None or cost < best[0]:
            best = (cost, candidate)
    return best[1]


def _permuted(shape, perm):
    if shape is None:
        return None
    return [shape[i] for i in perm]


def _match(node: gs.Node):
    """(node, plan) for a two-input family einsum, or a ``Skip``."""
    if len(node.inputs) != 2:
        return Skip("not two inputs")
    equation = node.attrs.get("equation")
    if isinstance(equation, bytes):
        equation = equation.decode()
    plan = _plan(equation or "")
    return plan if isinstance(plan, Skip) else (node, plan)


def rewrite_einsum_attention(graph: gs.Graph) -> tuple[gs.Graph, int]:
    """Replace family einsums by MatMul; the count is the number of einsums rewritten."""
    names = Names(graph)

    def rewrite(matched) -> None:
        node, (swap, perm_left, perm_right, perm_out) = matched
        left, right = (node.inputs[1], node.inputs[0]) if swap else (node.inputs[0], node.inputs[1])
        result = node.outputs[0]
        base = node.name or "einsum"
        node.inputs.clear()
        node.outputs.clear()

        def transposed(tensor, perm, tag):
            if perm is None:
                return tensor
            out = gs.Variable(names(f"{base}_{tag}_t"), dtype=tensor.dtype, shape=_permuted(tensor.shape, perm))
            graph.nodes.append(gs.Node("Transpose", names(f"{base}/Transpose_{tag}"), {"perm": perm}, [tensor], [out]))
            return out

        mm_left = transposed(left, perm_left, "a")
        mm_right = transposed(right, perm_right, "b")
        if perm_out is None:
            graph.nodes.append(gs.Node("MatMul", names(f"{base}/MatMul"), inputs=[mm_left, mm_right], outputs=[result]))
        else:
            inverse = [perm_out.index(i) for i in range(len(perm_out))]
            mm_out = gs.Variable(names(f"{base}_mm"), dtype=result.dtype, shape=_permuted(result.shape, inverse))
            graph.nodes.append(gs.Node("MatMul", names(f"{base}/MatMul"), inputs=[mm_left, mm_right], outputs=[mm_out]))
            graph.nodes.append(gs.Node("Transpose", names(f"{base}/Transpose_out"), {"perm": perm_out}, [mm_out], [result]))

    result = apply_rule(graph, "Einsum", _match, rewrite)
    graph.cleanup().toposort()
    return graph, result.count
