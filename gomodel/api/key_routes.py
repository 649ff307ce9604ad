"""The admin API's managed keys' Klein routes, under C{/admin/api/v1/auth-keys}: L{gomodel.api.keys}' handlers."""

from klein import Klein

from gomodel.api.keys import Keys
from gomodel.http.render import install as install_error_handlers


class KeysAPI(Keys):
    """C{POST|GET /auth-keys}, C{GET|PATCH /auth-keys/{id}}, C{POST /auth-keys/{id}/deactivate},
    C{POST /auth-keys/{id}/rotate}, C{POST /auth-keys/{id}/budgets/reset}."""

    app = Klein()
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False  # a doubled slash is a 404, never a redirect (before any route)

    app.route("/", methods=["POST"])(Keys.create)
    app.route("/", methods=["GET"])(Keys.list)
    app.route("/<key_id>", methods=["GET"])(Keys.get)
    app.route("/<key_id>", methods=["PATCH", "PUT"])(Keys.update)
    app.route("/<key_id>/deactivate", methods=["POST"])(Keys.deactivate)
    app.route("/<key_id>/rotate", methods=["POST"])(Keys.rotate)
    app.route("/<key_id>/budgets/reset", methods=["POST"])(Keys.reset_budgets)


install_error_handlers(KeysAPI.app)
