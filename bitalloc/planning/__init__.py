"""Planning: the ILP and exact solvers, constraints, sweeps, reports, the plan file.

Import the modules (`planner`, `pipeline`, `report`, `plan_file`, `mckp`) directly; this
package loads nothing heavy on import (`bitalloc apply` reads plans without pandas or PuLP).
"""
