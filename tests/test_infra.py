"""infra/ checked offline: every manifest is read by the same validators the real tools use,
and every entrypoint it names is resolved in our code.

- the Ray cluster-launcher YAML against the JSON schema shipped inside the installed ray
  package (and Ray's own `prepare_config` + `validate_config`, what `ray up` runs first);
- KubeRay manifests: kinds/apiVersions, Ray version = the installed Ray, one image, GPU groups
  that really ask for `nvidia.com/gpu`, autoscaling bounds, volumes that exist;
- the RayService's serveConfigV2 through Ray Serve's own schema, its import_path resolved with
  importlib and the app built with its args (on a tiny model directory);
- every `sora ...` command line (manifests, comments, launcher) parsed by our CLI parser;
- prefect.yaml through Prefect's own model of it, its entrypoints loaded as flows, its
  parameters validated against the flows' signatures, its cron schedules equal to `sora
  deploy`'s, its job variables rendered into the work pool's Kubernetes Job;
- the Dockerfile: instructions parse, COPY sources exist and survive .dockerignore, torch is
  pinned and installed before the project, non-root, ENTRYPOINT `sora`;
- docs/SCALING.md quotes the reference-clip figures the code computes.

Nothing here needs Docker, kubectl, a cluster or a network; the whole file takes seconds.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import inspect
import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "ray-cluster.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
WORK_POOL = INFRA / "prefect" / "work-pool.json"
PREFECT_YAML = ROOT / "prefect.yaml"
SCALING = ROOT / "docs" / "SCALING.md"

# The one image every manifest runs (built from infra/docker/Dockerfile); its tag is the
# project version, so a release bumps both together.
IMAGE_REPO = "registry.example.com/sora-ray"

# KubeRay kinds expected in each manifest file (ray.io/v1 is the stable API since KubeRay 1.0).
EXPECTED_KINDS = {
    "raycluster.yaml": [("ray.io/v1", "RayCluster")],
    "rayjob-train.yaml": [("ray.io/v1", "RayJob")],
    "rayservice.yaml": [("ray.io/v1", "RayService")],
    "models-pvc.yaml": [("v1", "PersistentVolumeClaim")],
}


def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


# --------------------------------------------------------------------------- cluster launcher
def ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"the installed ray ships no {path}"
    return json.loads(path.read_text())


def test_cluster_launcher_validates_against_rays_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_docs(LAUNCHER)[0]
    jsonschema.validate(config, ray_schema())
    # What `ray up` does before it touches a cloud: fill the provider's defaults, validate again
    # (head type among the node types, sum of min_workers within max_workers, ...).
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_launcher_schema_check_is_not_vacuous():
    """A misspelt field must fail: proves the schema is strict where our file could go wrong."""
    import jsonschema

    config = load_docs(LAUNCHER)[0]
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu"]["max_worker"] = bad["available_node_types"]["gpu"].pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu"]["resources"]["GPU"] = "8"  # resources are integers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())


def test_cluster_launcher_node_types_and_install_order():
    config = load_docs(LAUNCHER)[0]
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0, "keep tasks off the head"
    assert types["gpu"]["resources"]["GPU"] >= 1 and "GPU" not in types["cpu"]["resources"]
    for name, t in types.items():
        if name != config["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"], name
    # torch pinned and installed before the project (docs/setup-notes.md: otherwise pip resolves a new torch)
    cmds = config["setup_commands"]
    torch_i = next(i for i, c in enumerate(cmds) if "torch==2.13.0" in c)
    project_i = next(i for i, c in enumerate(cmds) if re.search(r"pip install .*-e ~/sora\b", c))
    assert torch_i < project_i, cmds
    assert "download.pytorch.org/whl/cu" in cmds[torch_i], "GPU nodes need the CUDA wheel"
    # the checkout is synced without the local virtual environment (GBs of CPU-only wheels)
    assert ".venv" in config["rsync_exclude"] and config["file_mounts"]["~/sora"] == "."


# --------------------------------------------------------------------------- KubeRay manifests
def kuberay_docs() -> dict[str, list[dict]]:
    return {p.name: load_docs(p) for p in sorted(KUBERAY.glob("*.yaml"))}


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: the RayCluster's, the RayJob's and the RayService's."""
    out = []
    for name, docs in kuberay_docs().items():
        for d in docs:
            spec = d["spec"]
            if d["kind"] == "RayCluster":
                out.append((f"{name}:RayCluster", spec))
            elif d["kind"] == "RayJob":
                out.append((f"{name}:RayJob", spec["rayClusterSpec"]))
            elif d["kind"] == "RayService":
                out.append((f"{name}:RayService", spec["rayClusterConfig"]))
    return out


def pod_templates(spec: dict) -> list[tuple[str, dict | None, dict]]:
    """(group name, worker group or None for the head, pod spec) of a RayCluster spec."""
    out = [("head", None, spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g, g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def test_manifests_parse_with_expected_kinds():
    docs = kuberay_docs()
    assert set(docs) == set(EXPECTED_KINDS), f"unexpected manifests: {sorted(docs)}"
    for name, expected in EXPECTED_KINDS.items():
        got = [(d["apiVersion"], d["kind"]) for d in docs[name]]
        assert got == expected, name
        for d in docs[name]:
            assert d["metadata"]["name"] and d["metadata"]["namespace"] == "sora", name


def test_ray_clusters_match_the_image_and_request_resources():
    import ray

    claims = {d["metadata"]["name"] for d in kuberay_docs()["models-pvc.yaml"]}
    specs = cluster_specs()
    assert len(specs) == 3
    for where, spec in specs:
        assert spec["rayVersion"] == ray.__version__ == "2.60.0", where
        for group, wg, pod in pod_templates(spec):
            for c in pod["containers"]:
                assert c["image"] == f"{IMAGE_REPO}:{project_version()}", (where, group)
                res = c["resources"]
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res[kind]), (where, group, kind)
                gpus = int(res["limits"].get("nvidia.com/gpu", 0))
                assert (gpus >= 1) == (group == "gpu"), f"{where}/{group}: nvidia.com/gpu={gpus}"
                if gpus:  # Kubernetes requires requests == limits for extended resources
                    assert int(res["requests"]["nvidia.com/gpu"]) == gpus
                    assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), where
                mounts = {m["name"] for m in c.get("volumeMounts", [])}
                volumes = {v["name"]: v for v in pod.get("volumes", [])}
                assert mounts <= set(volumes), (where, group, mounts - set(volumes))
            for v in pod.get("volumes", []):
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims, (where, v)
            if wg is not None:
                assert 0 <= wg["minReplicas"] <= wg["replicas"] <= wg["maxReplicas"], (where, group)
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: keep tasks off the head"


def test_raycluster_autoscales_cpu_and_gpu_groups():
    (cluster,) = kuberay_docs()["raycluster.yaml"]
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert g["maxReplicas"] > g["minReplicas"], f"{g['groupName']} cannot scale"
    assert groups["gpu"]["minReplicas"] == 0, "idle GPUs scale to zero"


def test_rayjob_trains_on_its_own_gang_and_shuts_down():
    from flows.cli import build_parser

    (job,) = kuberay_docs()["rayjob-train.yaml"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    args = build_parser().parse_args(shlex.split(spec["entrypoint"])[1:])
    assert args.command == "train" and args.gpu
    # one Ray Train worker per GPU: the gang must hold exactly --workers GPUs, all at once
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert gpus == args.workers, f"--workers {args.workers} but the job's cluster has {gpus} GPUs"
    for g in spec["rayClusterSpec"]["workerGroupSpecs"]:
        assert g["minReplicas"] == g["replicas"] == g["maxReplicas"]
    # the cluster is deleted at the end: checkpoints must be in object storage, and the model
    # directory on the shared volume that the driver (head pod) mounts
    assert "://" in args.storage, "checkpoints on a pod's disk die with the cluster"
    head_mounts = [m["mountPath"] for c in spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
                   for m in c.get("volumeMounts", [])]
    assert any(args.out.startswith(p.rstrip("/") + "/") for p in head_mounts), (args.out, head_mounts)
    assert any(args.vae.startswith(p.rstrip("/") + "/") for p in head_mounts), (args.vae, head_mounts)


# --------------------------------------------------------------------------- RayService
def serve_config() -> dict:
    from ray.serve.schema import ServeDeploySchema

    (svc,) = kuberay_docs()["rayservice.yaml"]
    raw = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(raw)  # Ray Serve's own schema (what the operator submits)
    return raw


def test_rayservice_serve_config_parses_and_fits_the_cluster():
    raw = serve_config()
    (app,) = raw["applications"]
    assert app["import_path"] == "pipelines.serve:build_app" and app["route_prefix"] == "/"
    (svc,) = kuberay_docs()["rayservice.yaml"]
    (gpu,) = [g for g in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    # one replica per GPU pod: Serve can only scale as far as the cluster can
    assert 1 <= app["args"]["min_replicas"] <= app["args"]["max_replicas"] <= gpu["maxReplicas"]
    assert "api_key" not in app["args"], "secrets come from the sora-api Secret, not the manifest"


def resolve_import_path(import_path: str):
    module_name, _, attr = import_path.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr)


def test_rayservice_import_path_builds_our_app(tmp_path):
    if not (ROOT / "pipelines" / "serve.py").is_file():  # once it exists, an import error fails here
        pytest.skip("pipelines/serve.py (the Serve app) is not written yet")
    from ray.serve import Application

    import tiny_model

    (app,) = serve_config()["applications"]
    builder = resolve_import_path(app["import_path"])
    assert callable(builder)
    args = dict(app["args"])
    unknown = set(args) - set(inspect.signature(builder).parameters) if not _takes_one_dict(builder) else set()
    assert not unknown, f"serveConfigV2 args the builder does not take: {unknown}"
    # the manifest's paths exist only in the cluster: swap in a tiny model and a local store
    args["model"] = tiny_model.build_tiny_model(str(tmp_path / "model"))
    args["storage"] = str(tmp_path / "store")
    built = builder(args) if _takes_one_dict(builder) else builder(**args)
    assert isinstance(built, Application), type(built)


def _takes_one_dict(fn) -> bool:
    """Serve builders take the args dict as one positional parameter (`build_app(args)`)."""
    params = list(inspect.signature(fn).parameters.values())
    return len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


# --------------------------------------------------------------------------- sora command lines
NOT_A_COMMAND_BEFORE = {"-n", "--namespace", "namespace"}  # `kubectl -n sora ...`


def sora_commands(text: str) -> list[list[str]]:
    """`sora SUBCOMMAND ...` invocations in a shell-ish text: split at ; && || | and newlines,
    then from each `sora` token that is followed by a subcommand-like word to the end."""
    out = []
    for piece in re.split(r"\n|;|&&|\|\|?", text):
        try:
            tokens = shlex.split(piece, comments=True)
        except ValueError:  # an apostrophe in prose
            continue
        for i, tok in enumerate(tokens[:-1]):
            if tok == "sora" and (i == 0 or tokens[i - 1] not in NOT_A_COMMAND_BEFORE) \
                    and re.fullmatch(r"[a-z][a-z-]*", tokens[i + 1]):
                out.append(tokens[i:])
                break
    return out


def strings_in(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in strings_in(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in strings_in(v)]
    return []


def collect_command_lines() -> list[tuple[str, list[str]]]:
    """From YAML values (the RayJob entrypoint, launcher commands, ...), from the comment lines
    of every infra file and from infra/README.md (the usage examples people copy)."""
    found = []
    files = sorted(KUBERAY.glob("*.yaml")) + [LAUNCHER, PREFECT_YAML, DOCKERFILE]
    readme = INFRA / "README.md"
    found += [(str(readme.relative_to(ROOT)), cmd) for cmd in sora_commands(readme.read_text())]
    for path in files:
        rel = str(path.relative_to(ROOT))
        if path.suffix == ".yaml":
            for s in strings_in(load_docs(path)):
                found += [(rel, cmd) for cmd in sora_commands(s)]
        comments = "\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line)
        found += [(f"{rel} (comment)", cmd) for cmd in sora_commands(comments)]
    return found


COMMAND_LINES = collect_command_lines()


def test_command_line_extraction():
    text = "kubectl -n sora apply -f x.yaml; ray job submit -- sora train --data d --vae v --out o\n" \
           "echo done && sora --help  # not a subcommand\nname: sora"
    assert sora_commands(text) == [["sora", "train", "--data", "d", "--vae", "v", "--out", "o"]]
    where = {w for w, _ in COMMAND_LINES}
    assert {"infra/kuberay/rayjob-train.yaml", "infra/README.md"} <= where, where
    subcommands = {argv[1] for _, argv in COMMAND_LINES}
    assert {"train", "ingest", "encode", "generate-bulk"} <= subcommands, subcommands


@pytest.mark.parametrize("where,argv", COMMAND_LINES, ids=[f"{w}:{' '.join(a[:2])}" for w, a in COMMAND_LINES])
def test_sora_command_line_parses(where, argv):
    from flows.cli import ORDER, build_parser, command_modules

    sub = argv[1]
    assert sub in ORDER, f"{where}: `sora {sub}` is no subcommand of ours ({ORDER})"
    if sub.replace("-", "_") not in command_modules():
        pytest.skip(f"`sora {sub}` is planned (flows.cli.ORDER) but flows/commands/{sub.replace('-', '_')}.py is not written yet")
    args = build_parser().parse_args(argv[1:])
    assert args.command == sub and callable(args.func)


# --------------------------------------------------------------------------- Prefect
def prefect_config():
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = load_docs(PREFECT_YAML)[0]
    return raw, PrefectYamlModel.model_validate(raw)  # Prefect's own model of prefect.yaml


def work_pool_template() -> dict:
    return json.loads(WORK_POOL.read_text())


def test_prefect_yaml_deployments_and_schedules():
    from prefect.client.schemas.schedules import CronSchedule

    from flows.deploy import DATA_CRON, TRAINING_CRON

    _, model = prefect_config()
    by_name = {d.name: d for d in model.deployments}
    assert set(by_name) == {"nightly", "weekly", "on-demand"}
    expected = {"nightly": DATA_CRON, "weekly": TRAINING_CRON, "on-demand": None}  # same as `sora deploy`
    for name, cron in expected.items():
        schedules = by_name[name].schedules or []
        if cron is None:
            assert schedules == [], f"{name} runs on demand only"
            continue
        (s,) = schedules
        assert s.cron == cron, (name, s.cron)
        CronSchedule(cron=s.cron, timezone=s.timezone)  # raises on an invalid cron or timezone
    with pytest.raises(ValueError):
        CronSchedule(cron="0 2 * *")  # the validator really rejects a malformed cron


def test_prefect_entrypoints_are_flows_taking_the_parameters():
    from prefect import Flow

    _, model = prefect_config()
    for d in model.deployments:
        path, _, fn = d.entrypoint.partition(":")
        if not (ROOT / path).is_file():
            pytest.skip(f"{path} is not written yet")
        module = importlib.import_module(path[:-3].replace("/", "."))
        flow = getattr(module, fn)
        assert isinstance(flow, Flow), f"{d.entrypoint} is not a Prefect flow"
        flow.validate_parameters(d.parameters)  # pydantic validation against the signature
        if "overrides" in d.parameters:  # training_flow hands these to TrainConfig(**overrides)
            from pipelines.train import TrainConfig

            cfg = TrainConfig(preset=d.parameters.get("preset", "tiny"), max_minutes=1, **d.parameters["overrides"])
            assert cfg.use_gpu, "the cluster's training runs on GPUs"


def test_prefect_pull_step_matches_the_image():
    raw, model = prefect_config()
    (step,) = model.pull
    (directory,) = [v["directory"] for k, v in step.items() if k.endswith("set_working_directory")]
    assert directory == dockerfile_value("WORKDIR"), "flows/*.py must be where the pull step looks"
    copied = {src for args in dockerfile_args("COPY") for src in args[:-1]}
    for d in model.deployments:
        assert d.entrypoint.split("/")[0] in copied, f"{d.entrypoint} is not copied into the image"


def test_work_pool_template_is_valid_for_prefect():
    import jsonschema
    from prefect.server.schemas.actions import WorkPoolCreate

    template = work_pool_template()
    # the server's validation: every {{ placeholder }} of the job is a declared variable
    WorkPoolCreate(name="sora-k8s", type="kubernetes", base_job_template=template)
    variables = template["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    for name, prop in variables["properties"].items():
        if "default" in prop:
            jsonschema.validate(prop["default"], prop)
    job = template["job_configuration"]["job_manifest"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    # fields at the level Kubernetes reads them (a JobSpec field inside the pod spec is ignored)
    assert set(job["spec"]) <= {"backoffLimit", "parallelism", "completions", "ttlSecondsAfterFinished",
                                "activeDeadlineSeconds", "template"}, set(job["spec"])
    assert set(job["spec"]["template"]["spec"]) <= {"restartPolicy", "serviceAccountName", "containers", "volumes",
                                                    "nodeSelector", "tolerations"}, set(job["spec"]["template"]["spec"])
    (container,) = job["spec"]["template"]["spec"]["containers"]
    # the image's ENTRYPOINT is `sora`; the worker's `prefect flow-run execute` goes in args
    assert container["command"] == ["/usr/bin/env"] and container["args"] == "{{ command }}"


def test_prefect_job_variables_render_into_the_kubernetes_job():
    import jsonschema
    from prefect.utilities.templating import apply_values

    template = work_pool_template()
    props = template["variables"]["properties"]
    _, model = prefect_config()
    for d in model.deployments:
        assert d.work_pool.name == "sora-k8s"
        jv = d.work_pool.job_variables
        assert set(jv) <= set(props), f"{d.name}: undeclared job variables {set(jv) - set(props)}"
        for k, v in jv.items():
            jsonschema.validate(v, props[k])
        values = {k: p["default"] for k, p in props.items() if "default" in p} | jv | {"command": "prefect flow-run execute"}
        rendered = apply_values(template["job_configuration"], values)
        assert "{{" not in json.dumps(rendered), f"{d.name}: unrendered placeholders"
        (container,) = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"]
        assert container["image"] == f"{IMAGE_REPO}:{project_version()}"
        (vol,) = rendered["job_manifest"]["spec"]["template"]["spec"]["volumes"]
        claims = {x["metadata"]["name"] for x in kuberay_docs()["models-pvc.yaml"]}
        assert vol["persistentVolumeClaim"]["claimName"] in claims
        assert rendered["env"]["RAY_ADDRESS"].startswith("ray://sora-head-svc.sora."), "the RayCluster's head service"
    (cluster,) = kuberay_docs()["raycluster.yaml"]
    assert cluster["metadata"]["name"] == "sora", "KubeRay names the head service <name>-head-svc"


# --------------------------------------------------------------------------- Dockerfile
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "ENTRYPOINT", "CMD", "EXPOSE",
                "LABEL", "VOLUME", "HEALTHCHECK", "SHELL", "STOPSIGNAL", "ONBUILD"}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):  # comment inside a continued instruction
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        instr, _, args = buf.strip().partition(" ")
        assert instr.upper() in INSTRUCTIONS, f"unknown Dockerfile instruction {instr!r}"
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def dockerfile_args(instr: str) -> list[list[str]]:
    return [[a for a in shlex.split(args) if not a.startswith("--")] for i, args in dockerfile() if i == instr]


def dockerfile_value(instr: str) -> str:
    (value,) = [args for i, args in dockerfile() if i == instr][-1:]
    return value


def dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)


def test_dockerfile_parses_from_a_ray_gpu_base():
    steps = dockerfile()
    first = next(i for i, (instr, _) in enumerate(steps) if instr != "ARG")
    assert steps[first][0] == "FROM"
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    base = steps[first][1]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base.startswith("rayproject/ray:2.60.0-") and base.endswith("-gpu"), base


def test_dockerfile_copy_sources_exist_and_are_not_ignored():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = set()
    for args in dockerfile_args("COPY"):
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} does not exist"
            assert not dockerignored(src), f"COPY source {src} is excluded by .dockerignore"
            copied.add(src)
    # `pip install .` in the image needs every package pyproject includes (and its readme)
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"package {pattern} not copied into the image"
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    assert dockerignored(".venv") and dockerignored(".git"), "the build context must not carry the venv"


def test_dockerfile_installs_pinned_torch_before_the_project():
    runs = [args for i, args in dockerfile() if i == "RUN"]
    args = dict(a.split("=", 1) for i, a in dockerfile() if i == "ARG" and "=" in a)
    torch_i = next(i for i, r in enumerate(runs) if re.search(r"pip install .*torch==", r))
    project_i = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch_i < project_i
    assert args["TORCH_VERSION"] == "2.13.0" and "torch==${TORCH_VERSION}" in runs[torch_i]
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in runs[torch_i] and args["TORCH_CUDA"].startswith("cu")
    # the project's own pin agrees, so `pip install .` keeps the CUDA build
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps


def test_dockerfile_runs_as_non_root_with_the_sora_entrypoint():
    user = dockerfile_value("USER")
    assert user not in ("root", "0") and not user.startswith("0:"), user
    assert json.loads(dockerfile_value("ENTRYPOINT")) == ["sora"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sora"] == "flows.cli:main"
    module, _, fn = scripts["sora"].partition(":")
    assert callable(getattr(importlib.import_module(module), fn))


# --------------------------------------------------------------------------- docs/SCALING.md
def test_scaling_doc_quotes_the_codes_figures():
    """The reference clip's bucket, token count and DiT FLOPs/token in SCALING.md are what the
    code computes (if the bucketing or the model changes, the doc must be redone)."""
    from sora.buckets import assign_bucket
    from sora.dit import DiTConfig, flops_per_token

    text = SCALING.read_text()
    b = assign_bucket(1280, 720, 144, resolution="360p")
    t, h, w = b.latent_shape()
    tokens = t * (h // 2) * (w // 2)
    assert b.key in text, b.key
    assert f"{tokens:,}" in text, tokens
    for preset in ("xl",):
        fpt = flops_per_token(DiTConfig.preset(preset, in_channels=16, text_dim=384), tokens, 64)
        assert f"{fpt / 1e9:.2f} GFLOP" in text, f"{preset}: {fpt / 1e9:.2f} GFLOP per token"
