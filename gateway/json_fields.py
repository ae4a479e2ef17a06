"""Which JSON field names each transcoded REST route accepts, read from the descriptor set.

Envoy's gRPC-JSON transcoder drops JSON fields the request message does not define instead of
refusing them (it has no option for that: envoyproxy/envoy#46623), so a misspelt field would be
silently ignored. The gateway's Lua filter refuses them itself, from the tables built here: for
every HTTP binding whose body is a protobuf message (``body: "*"`` or a message-typed field,
not ``google.api.HttpBody``), the route and the message its JSON body becomes; for every message
reachable from those, the JSON names of its fields (proto name and lowerCamelCase, as the
protobuf JSON parser accepts both) and, for message-typed fields, the nested message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from google.api import annotations_pb2  # registers the google.api.http method option
from google.protobuf import descriptor_pb2

HTTP_BODY = "google.api.HttpBody"
# Messages whose JSON form is not "one key per field" (Struct, Any, Timestamp, ...): their
# content is not checked.
_FREE_FORM_PREFIX = "google.protobuf."
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE


@dataclass(frozen=True)
class JsonRoute:
    method: str  # HTTP method, upper case
    path_regex: str  # RE2 and Lua-compatible anchored pattern of the URL path
    lua_pattern: str
    message: str  # full name of the message the JSON body becomes


@dataclass(frozen=True)
class JsonSchema:
    routes: tuple[JsonRoute, ...]
    # message -> JSON key -> kind of its value: "" (a scalar, enum or free-form value),
    # "m:<message>" (a message, or a list of them), "M:<message>" (a map whose values are that
    # message) or "M:" (a map of scalars)
    fields: dict[str, dict[str, str]]


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _path_patterns(template: str) -> tuple[str, str]:
    """(RE2, Lua) anchored patterns of an http rule's path template: a variable matches one
    segment, or any number with ``**``."""
    regex, lua = "^", "^"
    for literal, variable in re.findall(r"([^{]*)(\{[^}]*\})?", template.split(":")[0]):
        regex += re.escape(literal)
        lua += re.sub(r"([^\w/])", r"%\1", literal)
        if variable:
            many = "**" in variable
            regex += ".+" if many else "[^/]+"
            lua += ".+" if many else "[^/]+"
    return regex + "$", lua + "$"


def json_schema(descriptor_path: Path, services: tuple[str, ...]) -> JsonSchema:
    image = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path.read_bytes())
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}
    service_protos: dict[str, descriptor_pb2.ServiceDescriptorProto] = {}

    def collect(prefix: str, protos) -> None:
        for proto in protos:
            name = f"{prefix}.{proto.name}" if prefix else proto.name
            messages[name] = proto
            collect(name, proto.nested_type)

    for file in image.file:
        collect(file.package, file.message_type)
        for service in file.service:
            service_protos[f"{file.package}.{service.name}"] = service

    routes: list[JsonRoute] = []
    for service_name in services:
        for method in service_protos[service_name].method:
            rule = method.options.Extensions[annotations_pb2.http]
            for binding in (rule, *rule.additional_bindings):
                root = _body_message(messages, method.input_type.lstrip("."), binding.body)
                verb = binding.WhichOneof("pattern")
                if root is None or verb is None or verb == "custom":
                    continue
                regex, lua = _path_patterns(getattr(binding, verb))
                routes.append(JsonRoute(verb.upper(), regex, lua, root))

    fields: dict[str, dict[str, str]] = {}
    pending = [route.message for route in routes]
    while pending:
        name = pending.pop()
        if name in fields:
            continue
        keys: dict[str, str] = {}
        for field in messages[name].field:
            kind = ""
            if field.type == _MESSAGE and not field.type_name.lstrip(".").startswith(
                    _FREE_FORM_PREFIX):
                child = field.type_name.lstrip(".")
                entry = messages[child]
                if entry.options.map_entry:
                    value = entry.field[1]
                    target = value.type_name.lstrip(".") if value.type == _MESSAGE else ""
                    if target.startswith(_FREE_FORM_PREFIX):
                        target = ""
                    kind = f"M:{target}"
                    child = target
                else:
                    kind = f"m:{child}"
                if child:
                    pending.append(child)
            for key in {field.name, field.json_name or _camel(field.name)}:
                keys[key] = kind
        fields[name] = keys
    return JsonSchema(tuple(routes), fields)


def _body_message(messages: dict, input_type: str, body: str) -> str | None:
    """The message a binding's JSON body becomes, or None (no body, HttpBody, a scalar)."""
    if not body:
        return None
    if body == "*":
        return None if input_type == HTTP_BODY else input_type
    field = next((f for f in messages[input_type].field if f.name == body), None)
    if field is None or field.type != _MESSAGE:
        return None
    name = field.type_name.lstrip(".")
    return None if name == HTTP_BODY or name.startswith(_FREE_FORM_PREFIX) else name


def lua_tables(schema: JsonSchema) -> str:
    """The schema as Lua source: JSON_ROUTES and JSON_FIELDS."""
    def quote(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["local JSON_ROUTES = {"]
    for route in schema.routes:
        lines.append(f"  {{{quote(route.method)}, {quote(route.lua_pattern)}, "
                     f"{quote(route.message)}}},")
    lines.append("}")
    lines.append("local JSON_FIELDS = {")
    for message, keys in sorted(schema.fields.items()):
        entries = ", ".join(f"[{quote(k)}] = {quote(v)}" for k, v in sorted(keys.items()))
        lines.append(f"  [{quote(message)}] = {{{entries}}},")
    lines.append("}")
    return "\n".join(lines) + "\n"


# Lua: json_body_message(method, path) -> the message a JSON body becomes on that route, or nil;
# scan_json(body, message) -> the dotted path of the first JSON key that is not a field of its
# message, or nil. Anything it cannot follow (malformed JSON, nesting
# deeper than 64) is left to the transcoder, which refuses it with its own 400.
LUA_CHECKER = r"""
local function scan_json(s, root)
  local i, n, depth = 1, #s, 0
  local function ws()
    i = string.find(s, "[^ \t\r\n]", i) or n + 1
  end
  local function str(want)  -- at the opening quote; the decoded text when wanted
    local j, parts = i + 1, {}
    while true do
      local k = string.find(s, '["\\]', j)
      if k == nil then error("malformed") end
      if want then parts[#parts + 1] = string.sub(s, j, k - 1) end
      if string.byte(s, k) == 34 then
        i = k + 1
        return want and table.concat(parts) or nil
      end
      local e = string.sub(s, k + 1, k + 1)
      if e == "u" then
        local code = tonumber(string.sub(s, k + 2, k + 5), 16)
        if code == nil then error("malformed") end
        -- a non-ASCII code point in a key never names a field: keep it unmatched
        if want then parts[#parts + 1] = code < 128 and string.char(code) or "\1" end
        j = k + 6
      else
        if want then parts[#parts + 1] = ({n = "\n", t = "\t", r = "\r", b = "\b",
                                            f = "\f"})[e] or e end
        j = k + 2
      end
    end
  end
  local value
  local function object(kind, where)
    local fields, values = JSON_FIELDS[kind], nil
    if kind ~= nil and string.sub(kind, 1, 2) == "M:" then
      values = string.sub(kind, 3)
    end
    i = i + 1
    ws()
    if string.sub(s, i, i) == "}" then i = i + 1; return end
    while true do
      ws()
      if string.sub(s, i, i) ~= '"' then error("malformed") end
      local key = str(true)
      ws()
      if string.sub(s, i, i) ~= ":" then error("malformed") end
      i = i + 1
      local child = nil
      if fields ~= nil then
        child = fields[key]
        if child == nil then error({field = where .. key}) end
        child = string.sub(child, 1, 2) == "m:" and string.sub(child, 3) or
                (child ~= "" and child or nil)
      elseif values ~= nil and values ~= "" then
        child = values
      end
      value(child, where .. key .. ".")
      ws()
      local c = string.sub(s, i, i)
      i = i + 1
      if c == "}" then return end
      if c ~= "," then error("malformed") end
    end
  end
  value = function(kind, where)
    ws()
    local c = string.sub(s, i, i)
    if c == "{" or c == "[" then
      depth = depth + 1
      if depth > 64 then error("malformed") end
      if c == "{" then
        object(kind, where)
      else
        i = i + 1
        ws()
        if string.sub(s, i, i) == "]" then
          i = i + 1
        else
          while true do
            value(kind, where)
            ws()
            local d = string.sub(s, i, i)
            i = i + 1
            if d == "]" then break end
            if d ~= "," then error("malformed") end
          end
        end
      end
      depth = depth - 1
    elseif c == '"' then
      str(false)
    else
      i = string.find(s, "[,}%] \t\r\n]", i) or n + 1
    end
  end
  local ok, err = pcall(value, root, "")
  if not ok and type(err) == "table" then return err.field end
  return nil
end

-- The message a request's JSON body becomes, or nil where the transcoder takes no JSON body.
local function json_body_message(method, path)
  path = string.match(path, "^[^?#]*")
  for _, route in ipairs(JSON_ROUTES) do
    if method == route[1] and string.match(path, route[2]) then
      return route[3]
    end
  end
  return nil
end
"""
