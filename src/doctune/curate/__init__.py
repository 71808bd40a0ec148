"""Curation: turn generated QA pairs into training data (rules, contamination guard, judge, dedup, split).

`doctune.curate.stage.run(cfg)` is the stage; the other modules hold one check each.
"""
