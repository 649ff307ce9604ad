"""The admin dashboard: a page in the browser over the admin API (see L{gomodel.dashboard.assets})."""

from gomodel.dashboard.assets import Dashboard, PAGES, SHELL_PATHS, STATIC_PREFIX

__all__ = ["Dashboard", "PAGES", "SHELL_PATHS", "STATIC_PREFIX"]
