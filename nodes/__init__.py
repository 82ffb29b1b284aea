"""ComfyUI glue of the ELLA pack: node classes, model patching, model folders and the token count route."""

from .apply import ApplyElla
from .convert_route import register_convert_route
from .encode import EllaTextEncode
from .folders import register_folders
from .loaders import LoadEllaModel, LoadT5Encoder
from .routes import register_routes

register_folders()
register_routes()
register_convert_route()

PREFIX = "EllaNodes_"
NODE_CLASS_MAPPINGS = {
    PREFIX + "LoadEllaModel": LoadEllaModel,
    PREFIX + "LoadT5Encoder": LoadT5Encoder,
    PREFIX + "TextEncode": EllaTextEncode,
    PREFIX + "ApplyElla": ApplyElla,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    PREFIX + "LoadEllaModel": "Load ELLA Model",
    PREFIX + "LoadT5Encoder": "Load T5 Encoder (ELLA)",
    PREFIX + "TextEncode": "ELLA Text Encode",
    PREFIX + "ApplyElla": "Apply ELLA",
}
