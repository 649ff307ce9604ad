"""The listening side: site, front (context, auth, dispatch), error rendering, headers and bodies."""
