"""Offline calibration of the semantic cache: the similarity threshold and the match verifier, fitted on
human-labelled paraphrase pairs (`frugal cache calibrate`), and the annotator panel's verdicts they use
(`qqp_audit.jsonl`). The serving path reads only what this writes (`gateway/cache/verifier.json`)."""
