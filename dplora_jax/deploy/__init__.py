"""Deployment across institutions: each runs its own client, a coordinator runs the server.

protocol (what travels, and what a deployment implements), client + client_state (an
institution's client), server (the coordinator), flower (Flower ServerApp / ClientApp), local (a
whole federation on 127.0.0.1), data (per-institution files of the simulation's partition).
"""
