"""Lowering through Apache TVM (Relax): ``compiler`` (the compile line), ``int8`` (the integer
rewrite of QDQ groups) and ``tune`` (MetaSchedule on top of bnfold's schedules)."""
