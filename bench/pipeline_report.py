"""bench/pipeline.py's results -> one markdown table (ready for BENCHMARKS.md).

`repeats` is a list (one per --repeats) of {(K, M): a worker's result}; a result holds, per
contender, the median step time of that repeat, and for minipipe the bubble and peak saved bytes.
Ratios are taken within a repeat (its contenders ran side by side), then their median is shown.
"""
import statistics

K1_REFERENCE = "minipipe gpipe"  # efficiency's K=1 figure for a contender that cannot run at K=1


def _rates(result: dict) -> dict:
    return {name: result["tok_per_step"] / row["step_s"] for name, row in result["rows"].items()}


def _spread(values: list[float], fmt: str) -> str:
    """median, and min-max when there are several."""
    text = format(statistics.median(values), fmt)
    if len(values) > 1:
        text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
    return text


def _efficiency(name: str, k: int, m: int, repeats: list[dict]) -> str:
    if k == 1 or (1, m) not in repeats[0]:
        return ""
    rate_k = statistics.median(_rates(rep[(k, m)])[name] for rep in repeats)
    k1 = [_rates(rep[(1, m)]) for rep in repeats]
    reference, mark = (name, "") if name in k1[0] else (K1_REFERENCE, "*")
    if reference not in k1[0]:
        return ""
    return f"{rate_k / (k * statistics.median(r[reference] for r in k1)):.2f}{mark}"


def _ratio(name: str, other, cell: tuple, repeats: list[dict]) -> str:
    """name's tokens/s over other's (a name, or a function of the repeat's rates), per repeat."""
    ratios = []
    for rep in repeats:
        rates = _rates(rep[cell])
        against = other(rates) if callable(other) else rates.get(other)
        if against:
            ratios.append(rates[name] / against)
    return _spread(ratios, ".2f") if ratios else ""


def _torch_fastest(rates: dict) -> float | None:
    return max((r for name, r in rates.items() if not name.startswith("minipipe ")), default=None)


def table(repeats: list[dict], args, namesakes: dict) -> str:
    """namesakes: minipipe schedule -> its torch namesake's class name."""
    lines = [f"Transformer L={args.layers} d={args.d_model} T={args.seq_len} B={args.batch_size}, "
             f"recompute={args.recompute}, V={args.virtual_stages} for the looped multi-chunk schedules "
             f"(2 for the V-placed), {args.threads} thread(s) per process; per repeat the median of "
             f"{args.steps} steps after {args.warmup} warm-up; {len(repeats)} repeat(s): median (min-max). "
             f"Efficiency: tok/s at K / (K x the same contender's tok/s at K=1, same M); * against "
             f"{K1_REFERENCE} at K=1.\n",
             "| K | M | contender | tok/s | efficiency | / torch namesake | / torch fastest | bubble measured "
             "| bubble theory | peak saved MiB per stage |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (k, m), first in repeats[0].items():
        for name, row in first["rows"].items():
            rates = [_rates(rep[(k, m)])[name] for rep in repeats]
            schedule = name.removeprefix("minipipe ")
            namesake = _ratio(name, namesakes[schedule], (k, m), repeats) if schedule in namesakes else ""
            bubble = (_spread([rep[(k, m)]["rows"][name]["bubble"] for rep in repeats], ".2f")
                      if "bubble" in row else "")
            theory = f"{row['bubble_theory']:.2f}" if "bubble_theory" in row else ""
            memory = ", ".join(f"{mib:.1f}" for mib in row["peak_mib"])
            lines.append(f"| {k} | {m} | {name} | {_spread(rates, ',.0f')} | {_efficiency(name, k, m, repeats)} "
                         f"| {namesake} | {_ratio(name, _torch_fastest, (k, m), repeats)} | {bubble} "
                         f"| {theory} | {memory} |")
        for name, reason in first["refused"].items():
            lines.append(f"| {k} | {m} | {name} | refused: {reason} | | | | | | |")
    return "\n".join(lines)
