#Requires -Version 7.0
<#
.SYNOPSIS
    Build the chatgate + Chainlit image in Azure Container Registry and roll it out to an
    existing Azure Container App, then check it through the public URL.

.DESCRIPTION
    Steps, each printed as the exact az command before it runs:
      1. az acr build: builds the Dockerfile's `app` target (chatgate + the Chainlit app in
         -AppDir) in the registry; no local Docker needed.
      2. Reads the live app (az containerapp show), and on the container named -ContainerName
         only sets the new image and the resources, env vars and probes from -ProbesFile
         (probes.yaml). `az containerapp update --yaml` replaces the whole containers array,
         so the script writes the complete live definition back with just those changes:
         other containers, their env vars, secrets, scale rules and ingress stay as they are.
      3. Ingress: target port 8000 (chatgate), transport http (HTTP/1.1, which carries the
         WebSocket upgrade; ACA relays WebSockets without any extra switch). When the app may
         run more than one replica, sticky sessions: Engine.IO polling sessions live in one
         replica's memory.
      4. Verifies through https://<fqdn>: GET /monitor/health answers 200, and a WebSocket
         handshake on /ws/socket.io/ switches protocols (101) and receives Engine.IO's open
         packet from Chainlit. Ends with a one-line VERDICT; exit code 1 when it fails.

    Needs: PowerShell 7, Azure CLI logged in (az login) with the containerapp commands, the
    powershell-yaml module (Install-Module powershell-yaml -Scope CurrentUser), an existing
    container app whose identity can pull from the registry (for example
    `az containerapp registry set --name <app> --resource-group <rg> --server <registry>.azurecr.io --identity system`).

.PARAMETER ResourceGroup
    Resource group of the container app (and of the registry). Default: chatgate-rg.

.PARAMETER AppName
    Name of the existing container app. Default: chatgate.

.PARAMETER Registry
    Azure Container Registry name (not the login server). Default: $env:ACR_NAME, else chatgateacr.

.PARAMETER ImageName
    Repository name in the registry. Default: chatgate.

.PARAMETER ImageTag
    Image tag. Default: the current git commit's short hash, else a UTC timestamp.

.PARAMETER ContainerName
    Container in the app to update. Default: chatgate. When the app has a single container
    with another name, that container is used (with a warning).

.PARAMETER AppDir
    Directory of the Chainlit app to ship, relative to the repository (Dockerfile build arg
    APP_DIR). Default: examples/chainlit.

.PARAMETER ProbesFile
    Container template with probes, resources and env. Default: probes.yaml next to this script.

.PARAMETER LiveAppJson
    Use this saved `az containerapp show -o json` output instead of reading the live app; with
    -DryRun it shows the exact definition that would be applied, without Azure access.

.PARAMETER SkipBuild
    Do not build; deploy an image tag that is already in the registry.

.PARAMETER SkipVerify
    Do not run the checks through the public URL.

.PARAMETER VerifyTimeoutSeconds
    How long to wait for the new revision to answer /monitor/health with 200. Default: 300.

.PARAMETER DryRun
    Print every az command (and the merged app definition, when it can be computed) without
    running anything. -WhatIf does the same.

.EXAMPLE
    ./deploy.ps1 -ResourceGroup my-rg -AppName my-chat -Registry myacr

.EXAMPLE
    ./deploy.ps1 -Registry myacr -DryRun

.EXAMPLE
    az containerapp show -n my-chat -g my-rg -o json > live.json
    ./deploy.ps1 -AppName my-chat -ResourceGroup my-rg -Registry myacr -LiveAppJson live.json -WhatIf
#>
[CmdletBinding(SupportsShouldProcess = $true)]
param(
    [string] $ResourceGroup = 'chatgate-rg',
    [string] $AppName = 'chatgate',
    [string] $Registry = $(if ($env:ACR_NAME) { $env:ACR_NAME } else { 'chatgateacr' }),
    [string] $ImageName = 'chatgate',
    [string] $ImageTag = '',
    [string] $ContainerName = 'chatgate',
    [string] $AppDir = 'examples/chainlit',
    [string] $ProbesFile = (Join-Path $PSScriptRoot 'probes.yaml'),
    [string] $LiveAppJson = '',
    [switch] $SkipBuild,
    [switch] $SkipVerify,
    [ValidateRange(10, 3600)]
    [int] $VerifyTimeoutSeconds = 300,
    [switch] $DryRun
)

Set-StrictMode -Version 3.0
$ErrorActionPreference = 'Stop'
$DryRun = [bool]($DryRun -or $WhatIfPreference)
# Our own prints and temp files stay real under -WhatIf; only az commands are skipped.
$WhatIfPreference = $false

function Write-Step([string] $Message) {
    Write-Host "==> $Message" -ForegroundColor Cyan
}

function Format-Arg([string] $Value) {
    if ($Value -match '^[A-Za-z0-9_./:=@,+-]+$') { return $Value }
    return "'" + ($Value -replace "'", "''") + "'"
}

# Runs az with the given arguments after printing the command. With -Capture returns its
# stdout as one string (for JSON and queries); otherwise az's output goes to the console.
# Under -DryRun nothing runs, queries included: the caller then says what it would do.
function Invoke-Az {
    param([Parameter(Mandatory)] [string[]] $Arguments, [switch] $Capture)
    $line = 'az ' + (($Arguments | ForEach-Object { Format-Arg $_ }) -join ' ')
    if ($DryRun) {
        Write-Host "[dry-run] $line" -ForegroundColor Yellow
        return $null
    }
    Write-Host "+ $line" -ForegroundColor DarkGray
    if ($Capture) {
        $output = & az @Arguments
    } else {
        & az @Arguments | Out-Host
        $output = @()
    }
    if ($LASTEXITCODE -ne 0) {
        throw "az failed with exit code ${LASTEXITCODE}: $line"
    }
    return ($output -join "`n")
}

function Get-DefaultTag {
    $sha = $null
    if (Get-Command git -ErrorAction SilentlyContinue) {
        $sha = & git -C $PSScriptRoot rev-parse "--short=12" HEAD 2>$null
        if ($LASTEXITCODE -ne 0) { $sha = $null }
    }
    if ($sha) { return "git-$sha" }
    return (Get-Date).ToUniversalTime().ToString('yyyyMMddHHmmss')
}

function Import-ProbesTemplate([string] $Path) {
    if (-not (Get-Module -ListAvailable -Name powershell-yaml)) {
        throw 'The powershell-yaml module is needed to read probes.yaml: Install-Module powershell-yaml -Scope CurrentUser'
    }
    Import-Module powershell-yaml
    $template = Get-Content -Raw -LiteralPath $Path | ConvertFrom-Yaml
    $containers = @($template['properties']['template']['containers'])
    if ($containers.Count -ne 1) {
        throw "$Path must describe exactly one container, found $($containers.Count)"
    }
    return $containers[0]
}

# Puts the image, resources, env vars and probes of $Template onto the container named
# $Name in the live app definition $App (hashtables from ConvertFrom-Json -AsHashtable).
# Everything else in $App is left as read.
function Merge-ChatgateContainer {
    param($App, $Template, [string] $Name, [string] $Image)
    $containers = @($App['properties']['template']['containers'])
    $target = @($containers | Where-Object { $_['name'] -eq $Name })
    if ($target.Count -eq 0) {
        if ($containers.Count -eq 1) {
            Write-Warning "No container named '$Name'; updating the app's only container '$($containers[0]['name'])'."
            $target = @($containers[0])
        } else {
            $names = ($containers | ForEach-Object { $_['name'] }) -join ', '
            throw "No container named '$Name' in the app (containers: $names). Pass -ContainerName."
        }
    }
    $container = $target[0]
    $container['image'] = $Image
    if ($Template.Contains('resources')) {
        $container['resources'] = @{
            cpu    = $Template['resources']['cpu']
            memory = $Template['resources']['memory']
        }
    }
    $envList = [System.Collections.Generic.List[object]]::new()
    if ($container.Contains('env') -and $container['env']) {
        foreach ($existing in $container['env']) { $envList.Add($existing) }
    }
    foreach ($wanted in @($Template['env'])) {
        if (-not $wanted) { continue }
        $entry = [ordered]@{ name = $wanted['name']; value = [string] $wanted['value'] }
        $index = -1
        for ($i = 0; $i -lt $envList.Count; $i++) {
            if ($envList[$i]['name'] -eq $wanted['name']) { $index = $i; break }
        }
        if ($index -ge 0) { $envList[$index] = $entry } else { $envList.Add($entry) }
    }
    $container['env'] = $envList.ToArray()
    $container['probes'] = @($Template['probes'])
    # Re-applying the live revisionSuffix would clash with the existing revision: let ACA
    # name the new one.
    $App['properties']['template'].Remove('revisionSuffix')
    return $container['name']
}

function Test-PublicEndpoint([string] $Fqdn, [int] $TimeoutSeconds) {
    $healthUrl = "https://$Fqdn/monitor/health"
    $deadline = (Get-Date).AddSeconds($TimeoutSeconds)
    $healthOk = $false
    Write-Step "GET $healthUrl (up to ${TimeoutSeconds}s while the new revision starts)"
    while ((Get-Date) -lt $deadline) {
        try {
            $response = Invoke-WebRequest -Uri $healthUrl -TimeoutSec 10 -SkipHttpErrorCheck
            Write-Host "    $($response.StatusCode) $($response.Content)"
            if ($response.StatusCode -eq 200) { $healthOk = $true; break }
        } catch {
            Write-Host "    no answer yet: $($_.Exception.Message)"
        }
        Start-Sleep -Seconds 5
    }

    $wsUrl = "wss://$Fqdn/ws/socket.io/?EIO=4&transport=websocket"
    Write-Step "WebSocket handshake $wsUrl"
    $wsOk = $false
    $socket = [System.Net.WebSockets.ClientWebSocket]::new()
    $timeout = [System.Threading.CancellationTokenSource]::new([TimeSpan]::FromSeconds(20))
    try {
        if ($socket.Options.PSObject.Properties.Name -contains 'CollectHttpResponseDetails') {
            $socket.Options.CollectHttpResponseDetails = $true
        }
        # ConnectAsync succeeds only on "101 Switching Protocols" (Connection: Upgrade).
        $socket.ConnectAsync([Uri] $wsUrl, $timeout.Token).GetAwaiter().GetResult()
        $status = if ($socket.PSObject.Properties.Name -contains 'HttpStatusCode') { [int] $socket.HttpStatusCode } else { 101 }
        Write-Host "    handshake: $status, state $($socket.State)"
        $buffer = [byte[]]::new(4096)
        $segment = [ArraySegment[byte]]::new($buffer)
        $received = $socket.ReceiveAsync($segment, $timeout.Token).GetAwaiter().GetResult()
        $text = [System.Text.Encoding]::UTF8.GetString($buffer, 0, $received.Count)
        Write-Host "    first frame: $text"
        # Engine.IO v4 open packet: "0{"sid":...}" straight from Chainlit through chatgate.
        $wsOk = ($status -eq 101) -and $text.StartsWith('0{')
        $socket.CloseAsync([System.Net.WebSockets.WebSocketCloseStatus]::NormalClosure, 'deploy check', $timeout.Token).GetAwaiter().GetResult()
    } catch {
        Write-Host "    WebSocket failed: $($_.Exception.GetBaseException().Message)"
    } finally {
        $socket.Dispose()
        $timeout.Dispose()
    }

    if ($healthOk -and $wsOk) {
        Write-Host "VERDICT: PASS - https://$Fqdn/ is healthy and WebSockets reach Chainlit through chatgate." -ForegroundColor Green
        return $true
    }
    $failed = @()
    if (-not $healthOk) { $failed += '/monitor/health never answered 200' }
    if (-not $wsOk) { $failed += 'the WebSocket handshake or Engine.IO open packet failed' }
    Write-Host "VERDICT: FAIL - $($failed -join '; '). See: az containerapp logs show --name $AppName --resource-group $ResourceGroup --follow" -ForegroundColor Red
    return $false
}

# ---------------------------------------------------------------------------------------------

if (-not $ImageTag) { $ImageTag = Get-DefaultTag }
if (-not (Test-Path -LiteralPath $ProbesFile)) { throw "Probes file not found: $ProbesFile" }
if (-not $DryRun -and -not (Get-Command az -ErrorAction SilentlyContinue)) {
    throw 'Azure CLI (az) not found: https://learn.microsoft.com/cli/azure/install-azure-cli'
}
$template = Import-ProbesTemplate $ProbesFile

$loginServer = "$Registry.azurecr.io"
$found = Invoke-Az -Capture @('acr', 'show', '--name', $Registry, '--query', 'loginServer', '--output', 'tsv')
if ($found) { $loginServer = $found.Trim() }
$image = "$loginServer/${ImageName}:$ImageTag"
Write-Step "Image $image"

if (-not $SkipBuild) {
    Write-Step 'Building in Azure Container Registry'
    # The repository is the build context; .dockerignore keeps target/ and .git out of the upload.
    Push-Location -LiteralPath $PSScriptRoot
    try {
        Invoke-Az @('acr', 'build', '--registry', $Registry, '--image', "${ImageName}:$ImageTag",
            '--file', 'Dockerfile', '--target', 'app', '--build-arg', "APP_DIR=$AppDir", '.')
    } finally {
        Pop-Location
    }
}

Write-Step "Reading the live app $AppName"
$liveJson = $null
if ($LiveAppJson) {
    $liveJson = Get-Content -Raw -LiteralPath $LiveAppJson
    Write-Host "    from $LiveAppJson"
} else {
    $liveJson = Invoke-Az -Capture @('containerapp', 'show', '--name', $AppName, '--resource-group', $ResourceGroup, '--output', 'json')
}

$mergedPath = Join-Path ([System.IO.Path]::GetTempPath()) "chatgate-$AppName-$ImageTag.yaml"
$maxReplicas = 10
$revisionsMode = 'Single'
$hasIngress = $true
if ($liveJson) {
    $app = $liveJson | ConvertFrom-Json -AsHashtable -Depth 100
    $updated = Merge-ChatgateContainer -App $app -Template $template -Name $ContainerName -Image $image
    # JSON is YAML: az reads this file with a YAML parser.
    $merged = $app | ConvertTo-Json -Depth 100
    Write-Step "Container '$updated' gets the new image and probes.yaml's resources, env and probes"
    if ($DryRun) {
        Write-Host $merged
    } else {
        Set-Content -LiteralPath $mergedPath -Value $merged -Encoding utf8NoBOM
    }
    $scale = $app['properties']['template']['scale']
    if ($scale -and $scale['maxReplicas']) { $maxReplicas = [int] $scale['maxReplicas'] }
    $configuration = $app['properties']['configuration']
    if ($configuration['activeRevisionsMode']) { $revisionsMode = [string] $configuration['activeRevisionsMode'] }
    $hasIngress = [bool] $configuration['ingress']
} else {
    Write-Host "    (dry run: would set image $image and probes.yaml's resources, env and probes on container '$ContainerName')"
}

Write-Step 'Applying the merged definition (new revision)'
Invoke-Az @('containerapp', 'update', '--name', $AppName, '--resource-group', $ResourceGroup, '--yaml', $mergedPath, '--output', 'none')
if (-not $DryRun) { Remove-Item -LiteralPath $mergedPath -ErrorAction SilentlyContinue }

Write-Step 'Ingress: target port 8000, transport http'
if ($hasIngress) {
    Invoke-Az @('containerapp', 'ingress', 'update', '--name', $AppName, '--resource-group', $ResourceGroup,
        '--target-port', '8000', '--transport', 'http', '--output', 'none')
} else {
    Invoke-Az @('containerapp', 'ingress', 'enable', '--name', $AppName, '--resource-group', $ResourceGroup,
        '--type', 'external', '--target-port', '8000', '--transport', 'http', '--output', 'none')
}

# ACA's default scale is up to 10 replicas when maxReplicas is unset.
if ($maxReplicas -gt 1) {
    if ($revisionsMode -ieq 'Single') {
        Write-Step "Sticky sessions (up to $maxReplicas replicas; Engine.IO polling sessions live in one replica)"
        Invoke-Az @('containerapp', 'ingress', 'sticky-sessions', 'set', '--name', $AppName,
            '--resource-group', $ResourceGroup, '--affinity', 'sticky', '--output', 'none')
    } else {
        Write-Warning "Up to $maxReplicas replicas in '$revisionsMode' revision mode: ACA offers sticky sessions only in single revision mode, so Socket.IO polling may break across replicas (or force websocket-only transports in .chainlit/config.toml)."
    }
}

if ($SkipVerify) {
    Write-Step 'Skipping the checks through the public URL (-SkipVerify)'
    exit 0
}
$fqdn = Invoke-Az -Capture @('containerapp', 'show', '--name', $AppName, '--resource-group', $ResourceGroup,
    '--query', 'properties.configuration.ingress.fqdn', '--output', 'tsv')
if ($DryRun) {
    Write-Host '[dry-run] would GET https://<fqdn>/monitor/health and open wss://<fqdn>/ws/socket.io/?EIO=4&transport=websocket'
    Write-Host 'VERDICT: DRY RUN - nothing was changed.'
    exit 0
}
if (-not $fqdn) { throw "The app has no ingress FQDN; is ingress external?" }
if (Test-PublicEndpoint -Fqdn $fqdn.Trim() -TimeoutSeconds $VerifyTimeoutSeconds) { exit 0 }
exit 1
