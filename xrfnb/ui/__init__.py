"""User interface (ui room): the dashboard, notebook figures and set-up, the report and the command line.

May import every other room; nothing imports it.
"""
