"""The page: one template; everything else is drawn by static/js/app.js from the JSON API."""
from flask import Blueprint, current_app, render_template

bp = Blueprint("pages", __name__)


@bp.get("/")
def index():
    return render_template("index.html")


@bp.get("/favicon.ico")
def favicon():
    """Browsers ask for /favicon.ico whatever the page links: the same icon, no 404."""
    return current_app.send_static_file("favicon.svg")
