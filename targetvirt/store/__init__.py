"""Metadata stores: the controller's durable tables, behind one interface."""
