"""The original MDLM's override names, rewritten to this code's names before Hydra composes.

Every command line of the original README and slurm scripts keeps working. A few of its keys
moved: the parameterization and the sampler are Hydra groups here (``algorithm=``, ``sampler=``,
one class and one YAML each), and some keys were renamed. :func:`translate` rewrites
``key=value`` overrides by this table; ``main.py`` applies it to ``sys.argv``, and tests that
compose configs apply it to their override lists.

============================================  ==========================================
original override                             here
============================================  ==========================================
``parameterization=subs|d3pm|sedd|ar``        ``algorithm=mdlm|d3pm|sedd|ar``
``sampling.predictor=NAME``                   ``sampler=NAME``
``sampling.temperature|top_p=V``             ``sampler.temperature|top_p=V`` (our earlier names)
``sampling.nucleus_p=V``                      ``sampler.top_p=V`` (ReMDM's name)
``eval.gen_ppl_eval_model_name_or_path=M``    ``eval.gen_ppl_eval_model=M``
``eval.perplexity_batch_size=N``              ``eval.gen_ppl_batch_size=N``
``model.attn_backend=flex|sdpa`` (BD3-LM)      ``attn_backend=flex|sdpa``
``diffusion=absorbing_state``                 (dropped: the only process of these algorithms)
``eval.generate_samples=...``                 (dropped: ppl_eval never samples here)
``eval.compute_perplexity_on_sanity=...``     (dropped: sanity validation is never reported)
``eval.data_paths.NAME=DIR``                  ``+eval.data_paths.NAME=DIR`` (a new dict entry)
============================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Sequence

# The original's parameterization names -> configs/algorithm/<name>.yaml.
ALGORITHM_OF_PARAMETERIZATION = {"subs": "mdlm", "d3pm": "d3pm", "sedd": "sedd", "ar": "ar"}

# original key -> our key (values unchanged, except ``parameterization``'s, mapped above).
RENAMED = {
    "parameterization": "algorithm",
    "sampling.predictor": "sampler",
    "sampling.temperature": "sampler.temperature",
    "sampling.top_p": "sampler.top_p",
    "sampling.nucleus_p": "sampler.top_p",  # ReMDM's name
    "eval.gen_ppl_eval_model_name_or_path": "eval.gen_ppl_eval_model",
    "eval.perplexity_batch_size": "eval.gen_ppl_batch_size",
    "model.attn_backend": "attn_backend",  # BD3-LM's name (a kernel choice, not part of the model)
}
# ``eval.data_paths.<name>=DIR`` adds an entry to the empty dict (the names are configs/data/'s, checked
# when the data set is loaded), so it needs no ``+``.
DATA_PATHS = "eval.data_paths."
# original keys that have no effect here: key -> the values accepted (None: any).
DROPPED: dict[str, tuple[str, ...] | None] = {
    "diffusion": ("absorbing_state",),
    "eval.generate_samples": None,
    "eval.compute_perplexity_on_sanity": None,
}


def _split(override: str) -> tuple[str, str, str, str] | None:
    """``(prefix, key, '=', value)`` of a ``[+|++|~]key=value`` override, else None."""
    key, sep, value = override.partition("=")
    if not sep or key.startswith("-"):
        return None
    prefix = key[: len(key) - len(key.lstrip("+~"))]
    return prefix, key[len(prefix):], sep, value


def _algorithm_value(value: str) -> str:
    """``subs`` -> ``mdlm`` (each element of a sweep ``a,b``); our own names pass through."""
    return ",".join(ALGORITHM_OF_PARAMETERIZATION.get(v.strip(), v.strip()) for v in value.split(","))


def translate(overrides: Sequence[str]) -> list[str]:
    """Rewrite the original's override names (see the module table) to ours.

    Raises:
        ValueError: an original name and its new name are both given with different values,
            or a dropped key is given a value that would change something.
    """
    out: list[str] = []
    renamed: dict[str, tuple[str, str]] = {}  # our key -> (the original key it came from, value)
    ours: dict[str, str] = {}                # our keys given under their own name -> value
    for override in overrides:
        parts = _split(override)
        if parts is None:
            out.append(override)
            continue
        prefix, key, sep, value = parts
        if key in DROPPED:
            accepted = DROPPED[key]
            if accepted is not None and value not in accepted:
                raise ValueError(f"{key}={value} is not supported: {key} can only be {list(accepted)} here.")
            continue
        if key.startswith(DATA_PATHS) and not prefix:
            out.append(f"+{override}")  # a new key of the empty dict eval.data_paths (names: configs/data/)
            continue
        if key in RENAMED:
            new_key = RENAMED[key]
            new_value = _algorithm_value(value) if key == "parameterization" else value
            renamed[new_key] = (key, new_value)
            _check_agree(new_key, ours, renamed)
            out.append(f"{prefix.replace('+', '') if '.' not in new_key else prefix}{new_key}{sep}{new_value}")
            continue
        ours[key] = value
        _check_agree(key, ours, renamed)
        out.append(override)
    return out


def _check_agree(key: str, ours: dict[str, str], renamed: dict[str, tuple[str, str]]) -> None:
    """An original name and its new name given together must agree."""
    if key in ours and key in renamed and ours[key] != renamed[key][1]:
        original, value = renamed[key]
        raise ValueError(f"{original}={value} (the original's name for {key}) contradicts {key}={ours[key]}; "
                         "give one of them.")
