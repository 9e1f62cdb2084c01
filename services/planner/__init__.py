"""Graft planner service."""
