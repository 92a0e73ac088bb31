"""graphopt.api"""
