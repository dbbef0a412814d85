"""Simulator: a cost model fitted to measured H200 step times, driving the engine's real
scheduler and switch policy over arrival traces at any rank count, model and link figures.

    moebius sim validate | refit | calibrate | run | project | pd
"""
